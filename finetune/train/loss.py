"""The training objective: next-token cross-entropy over the targets the loss mask keeps, in one pass or chunk by
chunk with the RNN state carried (train_type infctx, or state tuning on windows longer than chunk_len); and the
finiteness checks the non-finite guard uses."""

from __future__ import annotations

import torch
import torch.nn as nn

from finetune.infctx import chunked_loss, lm_totals, rwkv_core
from finetune.ops.head_ce import head_outputs_finite, masked_ce
from finetune.train.config import TrainConfig

Batch = dict[str, torch.Tensor]  # input_ids, targets [B, T] int64; loss_mask [B, T] float32


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over the unmasked targets: sum(mask * ce) / max(sum(mask), 1)."""
    total, count = masked_ce(logits, targets, loss_mask)
    return total / count.clamp(min=1.0)


def uses_chunks(cfg: TrainConfig, ids: torch.Tensor) -> bool:
    return cfg.train_type == "infctx" or (cfg.train_type == "state" and ids.shape[1] > cfg.chunk_len)


def window_totals(model: nn.Module, batch: Batch, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of mask * cross-entropy, sum of mask) for a batch, in one pass or chunk by chunk."""
    ids, targets, mask = batch["input_ids"], batch["targets"], batch["loss_mask"]
    if uses_chunks(cfg, ids):
        count = mask.float().sum()
        mean = chunked_loss(model, ids, targets, mask, cfg.chunk_len, checkpoint_chunks=torch.is_grad_enabled())
        return mean * count.clamp(min=1.0), count
    return lm_totals(model, ids, targets, mask)


def batch_loss_and_count(model: nn.Module, batch: Batch, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The training loss of a batch (what the optimizer minimises: 0 for a batch without a trained token), and the
    number of trained tokens it is the mean over."""
    total, count = window_totals(model, batch, cfg)
    return total / count.clamp(min=1.0), count


def batch_loss(model: nn.Module, batch: Batch, cfg: TrainConfig) -> torch.Tensor:
    """The training loss of a batch (what the optimizer minimises)."""
    return batch_loss_and_count(model, batch, cfg)[0]


def finite_flag(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """Whether every element of every tensor is finite, as a bool tensor still on the device (not read: the caller
    decides when to wait for it); None when there is nothing to check."""
    flags = [torch.isfinite(t).all() for t in tensors if t.numel()]
    return torch.stack(flags).all() if flags else None


def tensors_finite(tensors: list[torch.Tensor]) -> bool:
    """Every element of every tensor is finite (one device sync, not one per tensor)."""
    flag = finite_flag(tensors)
    return True if flag is None else bool(flag)


@torch.no_grad()
def outputs_finite(model: nn.Module, batch: Batch, cfg: TrainConfig) -> bool:
    """Whether the model's outputs on `batch` are finite: the logits (one pass), or for chunked training the
    cross-entropy of every position (a non-finite logit makes it non-finite). Run in eval mode (no dropout); the
    caller provides the precision context the weights are used in."""
    was = model.training
    model.eval()
    try:
        ids = batch["input_ids"]
        if uses_chunks(cfg, ids):
            total, _ = window_totals(model, dict(batch, loss_mask=torch.ones_like(batch["loss_mask"])), cfg)
            return bool(torch.isfinite(total))
        return head_outputs_finite(model(ids, apply_head=False), rwkv_core(model).head)
    finally:
        model.train(was)
