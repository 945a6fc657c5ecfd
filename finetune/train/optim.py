"""AdamW over the trained tensors (torch's, or bitsandbytes' AdamW8bit with 8-bit moments) and the learning-rate
schedule.

Weight decay applies to matrices only (LoRA A and B, and emb / head when trained in full), never to the decays,
bonuses, token-shift mixes, layer norms or a learned state: decaying those toward 0 changes what the model computes,
not just its scale.

The schedule, for optimizer step k = 1 .. max_steps (W = warmup_steps, N = max_steps):
    k <= W              lr * k / W                                  (warmup from the first step: step 1 trains)
    constant            lr
    cosine (k > W)      lr_final + (lr - lr_final) * (1 + cos(pi * t)) / 2,   t = (k - W - 1) / max(N - W - 1, 1)
    linear (k > W)      lr + (lr_final - lr) * t
so the first step after warmup runs at lr and the last one at lr_final.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from finetune.errors import FinetuneError
from finetune.train.config import TrainConfig


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """The multiplier of `lr` at 0-based optimizer step `step` (torch's LambdaLR counts from 0)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    floor = cfg.lr_final / cfg.lr
    t = min((step - cfg.warmup_steps) / max(cfg.max_steps - cfg.warmup_steps - 1, 1), 1.0)
    if cfg.schedule == "linear":
        return 1.0 + (floor - 1.0) * t
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """`lr_factor` for LambdaLR. A closure, not a callable object: LambdaLR saves a callable object's attributes in
    the checkpoint and restores them on resume, which would bring back the old max_steps."""

    def factor(step: int) -> float:
        return lr_factor(cfg, step)

    return factor


def param_groups(params: Iterable[torch.nn.Parameter], weight_decay: float) -> list[dict]:
    """AdamW groups: matrices with `weight_decay`, everything else (vectors, the [1, 1, C] mixes, the state) with 0;
    empty groups left out."""
    decay, no_decay = [], []
    for p in params:
        (decay if p.dim() == 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def optimizer_class(cfg: TrainConfig) -> type[torch.optim.Optimizer]:
    """The class `cfg.optimizer` names; a one-line FinetuneError when its package is missing (the trainer asks
    before loading the model, not after)."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW
    try:
        from bitsandbytes.optim import AdamW8bit  # optional: block-wise 8-bit moments, CPU and CUDA
    except ImportError:
        raise FinetuneError(f"optimizer: {cfg.optimizer} needs bitsandbytes (pip install 'rwkv-lora[quant]'), or "
                            f"use optimizer: adamw") from None
    return AdamW8bit


def adamw_kernel(cfg: TrainConfig) -> dict[str, bool]:
    """How torch's AdamW runs its step. `fused` (one kernel over all tensors, CPU or CUDA: for the 144 LoRA tensors of
    a 12-layer RWKV-7 with LoRA on att and ffn, a step on the CPU takes 2-3 ms instead of 11-13 ms one tensor at a
    time) where Lightning takes it: not with gradient clipping under bf16-mixed / 16-mixed, which Lightning refuses
    for any optimizer that could unscale gradients itself, and not under DeepSpeed, whose engine steps the optimizer
    on its own partitions. Otherwise `foreach` (a few kernels over lists of tensors: torch's default on CUDA; 7 ms
    on the CPU in the example above)."""
    if cfg.deepspeed:
        return {}
    if cfg.precision == "32" or cfg.grad_clip is None:
        return {"fused": True}
    return {"foreach": True}


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: TrainConfig
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    kernel = adamw_kernel(cfg) if cfg.optimizer == "adamw" else {}
    opt = optimizer_class(cfg)(param_groups(params, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                               eps=cfg.eps, **kernel)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
