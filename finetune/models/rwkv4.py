"""RWKV-4 as one plain `nn.Module`: parallel mode for training, RNN mode (with a state) for generation.

The module tree mirrors BlinkDL's checkpoint keys exactly (`blocks.3.att.key.weight`, `blocks.0.ln0.bias`, ...), so a
checkpoint loads with a strict `load_state_dict`, `peft` finds the projections by their checkpoint names, and a merged
state dict is saved back without any renaming.

The recurrent state is one float32 tensor of shape [B, n_layer, 5, C]. For layer l:
    state[:, l, 0]  att token shift: the last ln1 output seen by the time-mix
    state[:, l, 1]  WKV numerator a  (true numerator = a * e^p)
    state[:, l, 2]  WKV denominator b
    state[:, l, 3]  WKV running max p (-1e38 when empty)
    state[:, l, 4]  ffn token shift: the last ln2 output seen by the channel-mix
This is the `rwkv` pip package's list `state[5*l + j]` with a batch dimension in front. (For dim_att != n_embd the
rows 1-3 would not fit; every published RWKV-4 has dim_att == n_embd, and the model checks it.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from finetune.errors import FinetuneError
from finetune.models.family import Family
from finetune.ops.wkv4 import P_EMPTY, wkv

# parameters that stay float32 whatever dtype the rest of the model is cast to: the decays feed exp(exp(.))
FP32_PARAMS = ("att.time_decay", "att.time_first")


@dataclass
class RWKVConfig:
    n_layer: int
    """Number of blocks."""
    n_embd: int
    """Width C of the residual stream."""
    vocab_size: int
    """Rows of emb.weight and head.weight (50277 for Pile/Raven, 65536 for World)."""
    dim_ffn: int | None = None
    """Hidden width of the channel-mix; 4 * n_embd when None (all published RWKV-4 models)."""

    def __post_init__(self) -> None:
        if self.dim_ffn is None:
            self.dim_ffn = 4 * self.n_embd


class TimeMix(nn.Module):
    """The attention-like sub-block: token shift, k/v/r projections, WKV, gated output."""

    def __init__(self, config: RWKVConfig) -> None:
        super().__init__()
        C = config.n_embd
        self.time_decay = nn.Parameter(torch.zeros(C))  # raw: the per-step decay is exp(-exp(time_decay))
        self.time_first = nn.Parameter(torch.zeros(C))  # the bonus u given to the current token
        self.time_mix_k = nn.Parameter(torch.ones(1, 1, C))
        self.time_mix_v = nn.Parameter(torch.ones(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.ones(1, 1, C))
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)

    def forward(self, x: torch.Tensor, shift: torch.Tensor, wkv_state: torch.Tensor | None):
        # xx: each position sees the previous token's input (the carried shift state at t = 0)
        xx = torch.cat([shift.to(x.dtype).unsqueeze(1), x[:, :-1]], dim=1)
        xk = x * self.time_mix_k + xx * (1 - self.time_mix_k)
        xv = x * self.time_mix_v + xx * (1 - self.time_mix_v)
        xr = x * self.time_mix_r + xx * (1 - self.time_mix_r)
        k = self.key(xk)
        v = self.value(xv)
        r = torch.sigmoid(self.receptance(xr))
        if k.dtype == torch.float16:  # the kernels take fp32/bf16; the state is fp32 either way
            k, v = k.float(), v.float()
        y, wkv_state = wkv(self.time_decay, self.time_first, k, v, wkv_state)
        return self.output(r * y.to(r.dtype)), x[:, -1], wkv_state


class ChannelMix(nn.Module):
    """The feed-forward sub-block: token shift, squared-ReLU MLP gated by a sigmoid receptance."""

    def __init__(self, config: RWKVConfig) -> None:
        super().__init__()
        C, F_ = config.n_embd, config.dim_ffn
        self.time_mix_k = nn.Parameter(torch.ones(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.ones(1, 1, C))
        self.key = nn.Linear(C, F_, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(F_, C, bias=False)

    def forward(self, x: torch.Tensor, shift: torch.Tensor):
        xx = torch.cat([shift.to(x.dtype).unsqueeze(1), x[:, :-1]], dim=1)
        xk = x * self.time_mix_k + xx * (1 - self.time_mix_k)
        xr = x * self.time_mix_r + xx * (1 - self.time_mix_r)
        k = torch.square(torch.relu(self.key(xk)))
        return torch.sigmoid(self.receptance(xr)) * self.value(k), x[:, -1]


class Block(nn.Module):
    def __init__(self, config: RWKVConfig, layer_id: int) -> None:
        super().__init__()
        C = config.n_embd
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(C)  # block 0 only: normalises the embedding
        self.ln1 = nn.LayerNorm(C)
        self.ln2 = nn.LayerNorm(C)
        self.att = TimeMix(config)
        self.ffn = ChannelMix(config)

    def forward(self, x: torch.Tensor, state: torch.Tensor):
        """x: [B, T, C]; state: this layer's [B, 5, C]. Returns (x, new layer state)."""
        dx, att_shift, wkv_state = self.att(self.ln1(x), state[:, 0], state[:, 1:4])
        x = x + dx
        dx, ffn_shift = self.ffn(self.ln2(x), state[:, 4])
        x = x + dx
        new_state = torch.cat([att_shift.float().unsqueeze(1), wkv_state.float(), ffn_shift.float().unsqueeze(1)],
                              dim=1)
        return x, new_state


class RWKV(nn.Module):
    def __init__(self, config: RWKVConfig) -> None:
        super().__init__()
        self.config = config
        self.emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_out = nn.LayerNorm(config.n_embd)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        """Recompute each block in the backward pass instead of keeping its activations (training only)."""
        self.checkpoint_dtypes: dict[str, torch.dtype] = {}
        """The dtype each tensor had in the file it was loaded from; `save_checkpoint` writes them back so."""
        self.initial_state: torch.Tensor | None = None
        """A learned start state [n_layer, 5, C] (a state-tuning adapter) used instead of the empty state; a plain
        attribute, not a parameter, so checkpoints keep exactly BlinkDL's keys."""

    # -- state ---------------------------------------------------------------------------------------------------------

    def empty_state(self, batch: int = 1, device: torch.device | str | None = None) -> torch.Tensor:
        """The state before any token: zeros, with the WKV running max p at -1e38 (or the learned `initial_state`
        when a state adapter is plugged in). Shape [B, n_layer, 5, C]."""
        device = self.emb.weight.device if device is None else device
        if self.initial_state is not None:
            return self.initial_state.to(device=device, dtype=torch.float32).unsqueeze(0).expand(batch, -1, -1, -1)
        state = torch.zeros(batch, self.config.n_layer, 5, self.config.n_embd, device=device)
        state[:, :, 3] = P_EMPTY
        return state

    # -- parallel mode -------------------------------------------------------------------------------------------------

    def forward(self, idx: torch.Tensor, state: torch.Tensor | None = None, return_state: bool = False):
        """idx [B, T] token ids -> logits [B, T, V] (float32 when the weights are).

        With `state` ([B, n_layer, 5, C], e.g. from a previous call) the sequence continues from it; gradients flow
        through it. `return_state=True` returns (logits, new_state).
        """
        B, T = idx.shape
        if state is None:
            state = self.empty_state(B, idx.device)
        x = self.blocks[0].ln0(self.emb(idx))
        new_states = []
        for i, block in enumerate(self.blocks):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x, s = checkpoint(block, x, state[:, i], use_reentrant=False)
            else:
                x, s = block(x, state[:, i])
            new_states.append(s)
        logits = self.head(self.ln_out(x))
        if return_state:
            return logits, torch.stack(new_states, dim=1)
        return logits

    # -- RNN mode ------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, tokens: torch.Tensor | Sequence[int], state: torch.Tensor | None = None):
        """One token per sequence: tokens [B] -> (logits [B, V], new state). RNN mode for generation.

        It is the parallel forward on a length-1 window: the same code path, so the two modes cannot drift apart.
        """
        tokens = torch.as_tensor(tokens, device=self.emb.weight.device).reshape(-1, 1)
        logits, state = self.forward(tokens, state, return_state=True)
        return logits[:, -1], state

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor | Sequence[int], state: torch.Tensor | None = None,
                chunk_len: int = 1024):
        """Feed a prompt of any length (chunk by chunk, so memory stays flat): tokens [T] or [B, T] ->
        (logits of the last position [B, V], state)."""
        tokens = torch.as_tensor(tokens, device=self.emb.weight.device)
        if tokens.dim() == 1:
            tokens = tokens.unsqueeze(0)
        logits = None
        for start in range(0, tokens.shape[1], chunk_len):
            logits, state = self.forward(tokens[:, start:start + chunk_len], state, return_state=True)
        if logits is None:
            raise ValueError("prefill needs at least one token")
        return logits[:, -1], state

    # -- dtype ---------------------------------------------------------------------------------------------------------

    def cast(self, dtype: torch.dtype) -> "RWKV":
        """Cast every weight to `dtype` except time_decay and time_first, which stay float32."""
        for name, p in self.named_parameters():
            p.data = p.data.float() if name.endswith(FP32_PARAMS) else p.data.to(dtype)
        return self

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ----------------------------------------------------------------------------------------------------------------------
# Initialisation (RWKV-LM's scheme for RWKV-4), used by `rwkv-lora init`


@torch.no_grad()
def init_rwkv_lm_(model: RWKV, seed: int = 0, emb_scale: float = 1e-4) -> RWKV:
    """Initialise in place the way RWKV-LM does for a fresh RWKV-4.

    Decays spread over channels from fast (-5) to slow (+3), steeper in later layers; a zigzag bonus around log(0.3);
    token-shift mixes ramped by channel and by layer (early layers mix in more of the previous token); tiny uniform
    embedding; orthogonal matrices, with key/receptance/output of the time-mix and value/receptance of the
    channel-mix starting at zero so each block starts as the identity; head orthogonal at gain 0.5.
    """
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    C, L = cfg.n_embd, cfg.n_layer
    ramp = torch.arange(C, dtype=torch.float64) / C  # 0 .. (C-1)/C over the channels
    for i, block in enumerate(model.blocks):
        ratio_0_to_1 = i / max(L - 1, 1)
        ratio_1_to_almost0 = 1.0 - i / L
        h = torch.arange(C, dtype=torch.float64)
        decay = -5 + 8 * (h / max(C - 1, 1)) ** (0.7 + 1.3 * ratio_0_to_1)
        zigzag = torch.tensor([((j + 1) % 3 - 1) * 0.5 for j in range(C)], dtype=torch.float64)
        att, ffn = block.att, block.ffn
        att.time_decay.copy_(decay)
        att.time_first.copy_(math.log(0.3) + zigzag)
        att.time_mix_k.copy_(ramp.pow(ratio_1_to_almost0).view(1, 1, C))
        att.time_mix_v.copy_((ramp.pow(ratio_1_to_almost0) + 0.3 * ratio_0_to_1).view(1, 1, C))
        att.time_mix_r.copy_(ramp.pow(0.5 * ratio_1_to_almost0).view(1, 1, C))
        ffn.time_mix_k.copy_(ramp.pow(ratio_1_to_almost0).view(1, 1, C))
        ffn.time_mix_r.copy_(ramp.pow(ratio_1_to_almost0).view(1, 1, C))
    zero = (".att.key.", ".att.receptance.", ".att.output.", ".ffn.value.", ".ffn.receptance.")
    for name, p in model.named_parameters():
        if ".ln" in name or name.startswith("ln_") or ".time_" in name:
            if name.endswith(".weight") and (".ln" in name or name.startswith("ln_")):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            continue
        if name == "emb.weight":
            p.uniform_(-emb_scale, emb_scale, generator=gen)
            continue
        if any(z in "." + name for z in zero):
            p.zero_()
            continue
        gain = math.sqrt(p.shape[0] / p.shape[1]) if p.shape[0] > p.shape[1] else 1.0
        if name == "head.weight":
            gain *= 0.5
        nn.init.orthogonal_(p, gain=gain, generator=gen)
    return model


# ----------------------------------------------------------------------------------------------------------------------
# The checkpoint layout


def config_from_state_dict(sd: dict[str, torch.Tensor], path: str | Path = "<memory>") -> RWKVConfig:
    """n_layer, n_embd, vocab and ffn width, read off the tensors (never typed by hand)."""
    try:
        vocab, n_embd = sd["emb.weight"].shape
        n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        dim_ffn = sd["blocks.0.ffn.key.weight"].shape[0]
    except (KeyError, ValueError) as e:
        raise FinetuneError(f"{path}: incomplete RWKV-4 checkpoint (missing or malformed {e})") from None
    return RWKVConfig(n_layer=n_layer, n_embd=n_embd, vocab_size=vocab, dim_ffn=dim_ffn)


def expected_shapes(config: RWKVConfig) -> dict[str, tuple[int, ...]]:
    """Every key of an RWKV-4 checkpoint with its shape."""
    C, V, F_ = config.n_embd, config.vocab_size, config.dim_ffn
    shapes: dict[str, tuple[int, ...]] = {"emb.weight": (V, C), "blocks.0.ln0.weight": (C,),
                                          "blocks.0.ln0.bias": (C,)}
    for i in range(config.n_layer):
        b = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            shapes[f"{b}{ln}.weight"] = (C,)
            shapes[f"{b}{ln}.bias"] = (C,)
        shapes[f"{b}att.time_decay"] = (C,)
        shapes[f"{b}att.time_first"] = (C,)
        for m in ("k", "v", "r"):
            shapes[f"{b}att.time_mix_{m}"] = (1, 1, C)
        for m in ("key", "value", "receptance", "output"):
            shapes[f"{b}att.{m}.weight"] = (C, C)
        shapes[f"{b}ffn.time_mix_k"] = (1, 1, C)
        shapes[f"{b}ffn.time_mix_r"] = (1, 1, C)
        shapes[f"{b}ffn.key.weight"] = (F_, C)
        shapes[f"{b}ffn.receptance.weight"] = (C, C)
        shapes[f"{b}ffn.value.weight"] = (C, F_)
    shapes["ln_out.weight"] = (C,)
    shapes["ln_out.bias"] = (C,)
    shapes["head.weight"] = (V, C)
    return shapes


def check_keys(sd: dict[str, torch.Tensor], config: RWKVConfig, path: str | Path = "<memory>") -> None:
    """Raise a one-line FinetuneError unless `sd` has exactly the RWKV-4 keys with the right shapes."""
    expected = expected_shapes(config)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}")
        raise FinetuneError(f"{path}: not a complete RWKV-4 checkpoint ({'; '.join(parts)})")
    for k, shape in expected.items():
        if tuple(sd[k].shape) != shape:
            raise FinetuneError(f"{path}: {k} has shape {tuple(sd[k].shape)}, expected {shape}")


def _is_time(name: str) -> bool:
    return ".att.time_" in name or ".ffn.time_" in name


def _is_ln(name: str) -> bool:
    return ".ln0." in name or ".ln1." in name or ".ln2." in name or name.startswith("ln_out.")


FAMILY = Family(
    name="rwkv4",
    title="RWKV-4",
    model_class=RWKV,
    config_from_state_dict=config_from_state_dict,
    expected_shapes=expected_shapes,
    init=init_rwkv_lm_,
    lora_parts={"att": ("key", "value", "receptance", "output"), "ffn": ("key", "value", "receptance")},
    full_groups={"time": _is_time, "ln": _is_ln, "emb": lambda n: n == "emb.weight",
                 "head": lambda n: n == "head.weight"},
    fp32_params=FP32_PARAMS,
    describe=lambda config: [f"width:       {config.n_embd} (ffn {config.dim_ffn})"],
)
