"""Training beyond one window: infinite-context chunks and state tuning.

infctx: a long sequence runs chunk by chunk with the RWKV state (token shifts and the WKV a, b, p) carried between
chunks. Gradients flow through the state across chunk boundaries (nothing is detached), and each chunk runs under
activation checkpointing with its loss computed inside, so what is kept between the forward and the backward pass is
one state per chunk boundary: memory is flat in ctx_len, and the loss and gradients equal those of one window.

State tuning: the only trained tensor is the initial RNN state of every layer (a few KB), a "virtual prefix".
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_loss(model: nn.Module, input_ids, targets, loss_mask, state):
    logits, state = model(input_ids, state, return_state=True)
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return (ce * loss_mask.reshape(-1)).sum(), state


def chunked_loss(model: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor,
                 chunk_len: int, state: torch.Tensor | None = None, checkpoint_chunks: bool = True) -> torch.Tensor:
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
    """A trainable start state: per layer the two token shifts and a virtual prefix of value `a` and log-weight `p`.

    The WKV part is written as (a, b=1, p): numerator a*e^p, denominator e^p, i.e. a prefix whose weighted mean value
    is a and whose total weight is e^p. That keeps the denominator positive whatever the optimiser does. At
    initialisation the shifts and a are 0 and p = init_log_weight (a faint prefix): the model starts almost exactly
    as the base, and Adam's step size does not depend on how faint it is.
    """

    def __init__(self, n_layer: int, n_embd: int, init_log_weight: float = -5.0) -> None:
        super().__init__()
        self.att_shift = nn.Parameter(torch.zeros(n_layer, n_embd))
        self.value = nn.Parameter(torch.zeros(n_layer, n_embd))
        self.log_weight = nn.Parameter(torch.full((n_layer, n_embd), float(init_log_weight)))
        self.ffn_shift = nn.Parameter(torch.zeros(n_layer, n_embd))

    def forward(self) -> torch.Tensor:
        """The start state [n_layer, 5, C] in the model's layout."""
        return torch.stack([self.att_shift, self.value, torch.ones_like(self.value), self.log_weight,
                            self.ffn_shift], dim=1)

    def batch(self, batch: int) -> torch.Tensor:
        return self().unsqueeze(0).expand(batch, -1, -1, -1)


class StateTuned(nn.Module):
    """An RWKV (frozen) that starts from a `StateTune`'s learned state: what `train_type: state` trains."""

    def __init__(self, model: nn.Module, tune: StateTune) -> None:
        super().__init__()
        self.model = model
        self.tune = tune

    def forward(self, idx: torch.Tensor, state: torch.Tensor | None = None, return_state: bool = False):
        if state is None:
            state = self.tune.batch(idx.shape[0]).to(idx.device)
        return self.model(idx, state, return_state=return_state)
