"""Multi-device training through Lightning's own engines, and saving adapters from sharded (ZeRO-3) parameters.

    strategy: auto | ddp | deepspeed_stage_2 | deepspeed_stage_2_offload | deepspeed_stage_3 | deepspeed_stage_3_offload

`lightning_strategy(cfg)` turns the config into what `pl.Trainer(strategy=...)` gets: the name itself for auto/ddp,
a `DeepSpeedStrategy` with the stage and offload arguments of Lightning's registered names for DeepSpeed (after
checking, with one-line errors, that deepspeed is installed and CUDA is present: Lightning's DeepSpeed refuses CPUs).

Under ZeRO-3 every rank holds a flat 1/world slice of each parameter (`param.ds_tensor`; `param.data` is empty), so a
state dict taken as-is is empty. `gathered(params)` makes the full tensors visible for the duration of a `with` block
(deepspeed.zero.GatheredParameters on a real ZeRO-3 model; `unshard` on the simulated layout the tests use); every
rank must enter it (it is a collective), and only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterable, Sequence

import torch

from finetune.errors import FinetuneError

# Lightning's registered DeepSpeed names -> DeepSpeedStrategy arguments (the same as its registry)
DEEPSPEED_ARGS: dict[str, dict[str, Any]] = {
    "deepspeed_stage_2": {"stage": 2},
    "deepspeed_stage_2_offload": {"stage": 2, "offload_optimizer": True},
    "deepspeed_stage_3": {"stage": 3},
    "deepspeed_stage_3_offload": {"stage": 3, "offload_optimizer": True, "offload_parameters": True},
}


def strategy_spec(name: str) -> tuple[str, dict[str, Any]]:
    """("auto" | "ddp" | "deepspeed", constructor arguments)."""
    if name in DEEPSPEED_ARGS:
        return "deepspeed", dict(DEEPSPEED_ARGS[name])
    if name in ("auto", "ddp"):
        return name, {}
    raise FinetuneError(f"strategy: {name!r} is not one of auto, ddp, {', '.join(DEEPSPEED_ARGS)}")


def deepspeed_available() -> bool:
    try:
        import deepspeed  # noqa: F401
    except Exception:
        return False
    return True


def lightning_strategy(cfg, cuda_available: bool | None = None, have_deepspeed: bool | None = None):
    """What to pass as `pl.Trainer(strategy=...)` for cfg.strategy; one-line FinetuneError when it cannot run."""
    kind, kwargs = strategy_spec(cfg.strategy)
    if kind != "deepspeed":
        return kind
    have_deepspeed = deepspeed_available() if have_deepspeed is None else have_deepspeed
    if not have_deepspeed:
        raise FinetuneError(f"strategy: {cfg.strategy} needs DeepSpeed (pip install 'rwkv-lora[deepspeed]'); or use "
                            f"strategy: ddp")
    cuda_available = torch.cuda.is_available() if cuda_available is None else cuda_available
    if not cuda_available or cfg.accelerator == "cpu":
        raise FinetuneError(f"strategy: {cfg.strategy} needs CUDA GPUs (Lightning's DeepSpeed does not run on the "
                            f"CPU); use strategy: ddp with accelerator: cpu")
    from pytorch_lightning.strategies import DeepSpeedStrategy

    return DeepSpeedStrategy(**kwargs)


def is_zero3(strategy) -> bool:
    return type(strategy).__name__ == "DeepSpeedStrategy" and bool(getattr(strategy, "zero_stage_3", False))


# ----------------------------------------------------------------------------------------------------------------------
# ZeRO-3 layout: each parameter flattened, padded to a multiple of world, rank r holding elements [r*n, (r+1)*n)


def shard(t: torch.Tensor, world: int) -> list[torch.Tensor]:
    """A tensor as ZeRO-3 partitions it: `world` flat slices of equal length (the last one zero-padded)."""
    flat = t.detach().reshape(-1)
    per = math.ceil(flat.numel() / world)
    padded = torch.zeros(per * world, dtype=flat.dtype)
    padded[:flat.numel()] = flat
    return [padded[r * per:(r + 1) * per].clone() for r in range(world)]


def unshard(shards: Sequence[torch.Tensor], shape: Sequence[int]) -> torch.Tensor:
    """The full tensor from the per-rank flat slices of `shard` (the padding dropped)."""
    flat = torch.cat([s.reshape(-1) for s in shards])
    numel = math.prod(shape)
    if flat.numel() < numel:
        raise ValueError(f"shards hold {flat.numel()} elements, fewer than the {numel} of shape {tuple(shape)}")
    return flat[:numel].reshape(tuple(shape)).clone()


def simulate_zero3(params: Iterable[torch.nn.Parameter], world: int) -> None:
    """Put parameters into the simulated ZeRO-3 layout: `p.ds_shards` per-rank slices, `p.ds_shape`, empty data."""
    for p in params:
        p.ds_shards = shard(p.data, world)
        p.ds_shape = tuple(p.shape)
        p.data = torch.empty(0, dtype=p.dtype)


@contextlib.contextmanager
def gathered(params: Iterable[torch.nn.Parameter]):
    """Full tensors inside the block: DeepSpeed's gather for real ZeRO-3 parameters (`ds_id`), `unshard` for the
    simulated layout (`ds_shards`), nothing for ordinary ones. Parameters are re-partitioned on exit."""
    params = list(params)
    real = [p for p in params if hasattr(p, "ds_id")]
    simulated = [p for p in params if hasattr(p, "ds_shards")]
    with contextlib.ExitStack() as stack:
        if real:
            import deepspeed

            stack.enter_context(deepspeed.zero.GatheredParameters(real, modifier_rank=None))
        for p in simulated:
            p.data = unshard(p.ds_shards, p.ds_shape).to(p.dtype)
        try:
            yield
        finally:
            for p in simulated:
                p.data = torch.empty(0, dtype=p.dtype)
