"""The head and the cross-entropy in one pass, a few rows at a time: the training loss without the [B, T, V] logits.

At ctx 1024 with the 65536-token World vocabulary the logits are 268 MB in fp32, and the usual
`F.cross_entropy(head(h))` keeps three tensors that size alive at once (the logits, their log-softmax saved for the
backward pass, its gradient): ~0.8 GB, more than the NF4 weights of a 1.5B model. Here the head is applied to
`rows_per_chunk` rows at a time; each chunk's loss and its gradient (softmax - one-hot, times the mask) are computed
together in the forward pass, and only the gradient with respect to the hidden states ([N, C], small) is kept for
the backward pass (and the head's weight gradient, when the head itself is trained in full). The same matmuls as the
plain path, so no time is lost, and peak memory holds one chunk of logits.

Hand-written because no maintained library does this on the CPU: Liger-Kernel's fused linear cross-entropy is
Triton (GPU only) and torchtune's chunked loss still takes the whole logits tensor from the model.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from finetune import pages

CHUNK_BYTES = 32 << 20  # fp32 logits per chunk: 128 rows of a 65536-token vocabulary
# On a GPU every chunk costs ~15 kernel launches, and a ctx 1024 x 8 batch in chunks of 128 rows (the CPU's size,
# chosen to stay in cache and out of page faults) queues ~1000 of them per pass, so the chunks there are bigger:
# 1024 rows of a 65536-token vocabulary, ~60 launches for that batch, for ~0.5 GB more at the peak (small beside a
# GPU's memory, even an 8 GB card's)
GPU_CHUNK_BYTES = 256 << 20


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """What losses and gradients accumulate in: float32, float64 for float64 inputs (the tests' exact runs)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.to(_acc_dtype(t.dtype))


def rows_per_chunk(vocab: int, device: torch.device | str = "cpu") -> int:
    """Rows of hidden states per chunk for a head with `vocab` rows on `device`."""
    budget = CHUNK_BYTES if torch.device(device).type == "cpu" else GPU_CHUNK_BYTES
    return max(1, budget // (4 * vocab))


def _widened(weight: torch.Tensor, buffer: torch.Tensor, in_file: list[pages.Range]
             ) -> Iterator[tuple[int, torch.Tensor]]:
    """A weight held narrower than the computation (a quantized base's bf16 head) a block of rows at a time, each
    copied into `buffer` ([rows, C] in the compute dtype, reused: a fresh tensor per block costs ~3x the copy in
    page faults): (first row, widened block). A weight left in a checkpoint's memory map (`in_file`, from
    `pages.file_mapping`) has each block's pages released once copied: it is read from the file, never resident."""
    rows = buffer.shape[0]
    for s in range(0, weight.shape[0], rows):
        n = min(rows, weight.shape[0] - s)
        block = buffer[:n].copy_(weight[s:s + n])
        pages.release(weight[s:s + n], in_file)
        yield s, block


def widen_buffer(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """The buffer `_widened` copies blocks of `weight` into, or None when products can use `weight` as it is
    (the same dtype, or autocast on)."""
    if weight.dtype == dtype or torch.is_autocast_enabled(weight.device.type):
        return None
    rows = max(1, CHUNK_BYTES // (4 * weight.shape[1]))
    return torch.empty(min(rows, weight.shape[0]), weight.shape[1], dtype=dtype, device=weight.device)


def _logits(hs: torch.Tensor, weight: torch.Tensor, buffer: torch.Tensor | None,
            in_file: list[pages.Range]) -> torch.Tensor:
    """hs W^T (n, V)."""
    if buffer is None:
        return F.linear(hs, weight)
    out = hs.new_empty(hs.shape[0], weight.shape[0])
    for s, block in _widened(weight, buffer, in_file):
        out[:, s:s + block.shape[0]] = F.linear(hs, block)
    return out


def _times_weight(p: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype, buffer: torch.Tensor | None,
                  in_file: list[pages.Range]) -> torch.Tensor:
    """p W (n, C) in `dtype` (p (n, V) float32 or float64)."""
    if buffer is None:
        return (p.to(weight.dtype) @ weight).to(dtype)
    out = torch.zeros(p.shape[0], weight.shape[1], dtype=dtype, device=p.device)
    for s, block in _widened(weight, buffer, in_file):
        out.addmm_(p[:, s:s + block.shape[0]].to(dtype), block)
    return out


class _HeadCrossEntropy(torch.autograd.Function):
    """sum(mask * CE(h W^T, targets)) over rows h [N, C]; weight [V, C]; the gradients are made in the forward pass."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                rows: int) -> torch.Tensor:
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=_acc_dtype(h.dtype), device=h.device)
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=_acc_dtype(weight.dtype), device=weight.device) if want_w else None
        buffer = widen_buffer(weight, h.dtype)  # None unless the head is held narrower (bf16 under fp32)
        in_file = pages.file_mapping(weight) if buffer is not None else []  # left in the checkpoint's map?
        for s in range(0, h.shape[0], rows):
            hs, ts, ms = h[s:s + rows], targets[s:s + rows], mask[s:s + rows]
            # (n, V); under autocast in its dtype, as the plain path
            logits = _at_least_fp32(_logits(hs, weight, buffer, in_file))
            lse = torch.logsumexp(logits, dim=-1)  # (n,)
            ce = lse - logits.gather(1, ts[:, None]).squeeze(1)
            total += (ce * ms).sum()
            if want_h or want_w:
                # d(sum mask * ce) / d logits = mask * (softmax - one_hot), built in place of the logits
                p = logits.sub_(lse[:, None]).exp_()
                p[torch.arange(p.shape[0], device=p.device), ts] -= 1
                p.mul_(ms[:, None])
                if want_h:
                    grad_h[s:s + rows] = _times_weight(p, weight, h.dtype, buffer, in_file)  # (n, C)
                if want_w:
                    grad_w += p.t() @ _at_least_fp32(hs)  # (V, C)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = None if grad_h is None else grad_h * grad_out.to(grad_h.dtype)
        gw = None if grad_w is None else (grad_w * grad_out).to(ctx.weight_dtype)
        return gh, gw, None, None, None


def masked_ce(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of mask * cross-entropy, sum of mask) of whole logits [..., V], in float32 (float64 for float64
    logits): the plain path."""
    ce = F.cross_entropy(_at_least_fp32(logits).reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    m = loss_mask.reshape(-1).float()
    return (ce * m).sum(), m.sum()


def fusable(head: nn.Module) -> bool:
    """The head computes x W^T with W its weight, a plain floating-point tensor that can be read directly: an
    nn.Linear, or a layer that says so (`plain_product`: a quantized base's head held in bf16), no bias, not
    LoRA-wrapped, quantized or sharded away by DeepSpeed ZeRO-3 (those take the plain path)."""
    return ((type(head) is nn.Linear or getattr(type(head), "plain_product", False)) and head.bias is None
            and not hasattr(head.weight, "ds_id") and type(head.weight.data) is torch.Tensor
            and head.weight.is_floating_point())


def head_cross_entropy(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor,
                       loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of mask * cross-entropy of head(hidden) against targets, sum of mask), in float32 (float64 for
    float64 hidden states).

    hidden [B, T, C] (the final hidden states, after ln_out), targets [B, T] int64, loss_mask [B, T]. Equals
    `F.cross_entropy(head(hidden))` weighted by the mask, gradients included, without the [B, T, V] logits."""
    if not fusable(head):
        return masked_ce(head(hidden), targets, loss_mask)
    m = loss_mask.reshape(-1).float()
    h = hidden.reshape(-1, hidden.shape[-1])  # (B*T, C)
    total = _HeadCrossEntropy.apply(h, head.weight, targets.reshape(-1), m,
                                   rows_per_chunk(head.weight.shape[0], h.device))
    return total, m.sum()


@torch.no_grad()
def head_outputs_finite(hidden: torch.Tensor, head: nn.Module) -> bool:
    """Whether every logit head(hidden) is finite, checked a chunk of rows at a time (hidden [..., C])."""
    h = hidden.reshape(-1, hidden.shape[-1])
    rows = rows_per_chunk(head.weight.shape[0], h.device)
    flags = [torch.isfinite(head(h[s:s + rows])).all() for s in range(0, h.shape[0], rows)]
    return bool(torch.stack(flags).all()) if flags else True
