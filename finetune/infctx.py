"""Training beyond one window: infinite-context chunks and state tuning.

infctx: a long sequence runs chunk by chunk with the RWKV state (an `RNNState`: token shifts and the WKV state)
carried between chunks. Gradients flow through the state across chunk boundaries (nothing is detached), and each chunk runs under
activation checkpointing with its loss computed inside, so what is kept between the forward and the backward pass is
one state per chunk boundary: memory is flat in ctx_len, and the loss and gradients equal those of one window.

State tuning: the only trained tensors are the initial RNN state of every layer (a few KB to a few MB).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from finetune.models import RNNState, family_for
from finetune.models.family import RWKVModel
from finetune.ops.head_ce import head_cross_entropy


def rwkv_core(model: nn.Module) -> RWKVModel:
    """The RWKV model itself, inside whatever wraps it (a peft model, a Lightning module)."""
    for m in model.modules():
        if isinstance(m, RWKVModel):
            return m
    raise TypeError(f"{type(model).__name__} holds no RWKV model")


def lm_totals(model: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor,
              state: RNNState | None = None, return_state: bool = False):
    """(sum of mask * next-token cross-entropy, sum of mask) of one window, in float32, plus the state after it when
    `return_state`. The [B, T, V] logits are never held whole: the head is applied with the loss, a few rows at a
    time (`finetune.ops.head_ce`)."""
    out = model(input_ids, state, return_state=return_state, apply_head=False)
    hidden, state = out if return_state else (out, None)
    total, count = head_cross_entropy(hidden, rwkv_core(model).head, targets, loss_mask)
    return (total, count, state) if return_state else (total, count)


def _chunk_loss(model: nn.Module, input_ids, targets, loss_mask, state):
    total, _, state = lm_totals(model, input_ids, targets, loss_mask, state, return_state=True)
    return total, state


def chunked_loss(model: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor,
                 chunk_len: int, state: RNNState | None = None, checkpoint_chunks: bool = True) -> torch.Tensor:
    """Mean masked next-token cross-entropy over [B, T], computed chunk by chunk with the state carried.

    Equal (to rounding) to the loss of the same window in one piece, with the same gradients, but the activations
    of only one chunk are alive at a time. `model` is the RWKV (or a peft wrapper around it): it must accept
    `(idx, state, return_state=True)`. `state` is an optional start state (e.g. a state-tuning adapter's).
    """
    total = input_ids.new_zeros((), dtype=torch.float32)
    for start in range(0, input_ids.shape[1], chunk_len):
        sl = slice(start, start + chunk_len)
        args = (input_ids[:, sl], targets[:, sl], loss_mask[:, sl].float(), state)
        if checkpoint_chunks and torch.is_grad_enabled():
            part, state = checkpoint(_chunk_loss, model, *args, use_reentrant=False)
        else:
            part, state = _chunk_loss(model, *args)
        total = total + part
    return total / loss_mask.float().sum().clamp(min=1)


class StateTune(nn.Module):
    """A trainable start state: per layer the two token shifts and the WKV state, for any family.

    The WKV part comes from the family's `state_tune` module when it has one (RWKV-4 learns a positive-weight
    "virtual prefix", see `finetune.models.rwkv4.PrefixWKV`), else it is the WKV state itself as a parameter
    (RWKV-5/6/7: one N x N matrix per head), starting at zero, i.e. exactly the base model's start.
    `train_shifts=False` keeps the token shifts at zero. By default (None) they are learned only by families without
    a state-file format: a family whose states travel as RWKV-Runner / RWKV-PEFT `time_state` files (which hold the
    WKV state alone) learns only the WKV state, as RWKV-PEFT does, so every such adapter exports without loss
    (`finetune.state_files`). The shifts are 2 x L x C numbers against L x H x N x N: little is given up.
    """

    def __init__(self, model: nn.Module, train_shifts: bool | None = None) -> None:
        super().__init__()
        family = family_for(model)
        if train_shifts is None:
            train_shifts = family.time_state_transposed is None
        template = model.zero_state(1, "cpu")
        L, C = template.att_shift.shape[1:]
        self.att_shift = nn.Parameter(torch.zeros(L, C), requires_grad=train_shifts)
        self.ffn_shift = nn.Parameter(torch.zeros(L, C), requires_grad=train_shifts)
        if family.state_tune is not None:
            self.wkv = family.state_tune(model.config)
        else:
            self.wkv = MatrixWKV(template.wkv[0])

    def forward(self) -> RNNState:
        """The start state, unbatched ([L, ...] per field)."""
        return RNNState(self.att_shift, self.wkv(), self.ffn_shift)

    def batch(self, batch: int) -> RNNState:
        return self().expand(batch)


class MatrixWKV(nn.Module):
    """The WKV state itself as the trained tensor, initialised to the empty state."""

    def __init__(self, empty: torch.Tensor) -> None:
        super().__init__()
        self.state = nn.Parameter(empty.detach().clone().float())

    def forward(self) -> torch.Tensor:
        return self.state


class StateTuned(nn.Module):
    """An RWKV (frozen) that starts from a `StateTune`'s learned state: what `train_type: state` trains."""

    def __init__(self, model: nn.Module, tune: StateTune) -> None:
        super().__init__()
        self.model = model
        self.tune = tune

    def forward(self, idx: torch.Tensor, state: RNNState | None = None, return_state: bool = False,
                apply_head: bool = True):
        if state is None:
            state = self.tune.batch(idx.shape[0]).to(idx.device)
        return self.model(idx, state, return_state=return_state, apply_head=apply_head)
