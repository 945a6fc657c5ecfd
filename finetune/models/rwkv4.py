"""RWKV-4 as one plain `nn.Module`: one forward for training, prompt prefill and single-token generation.

The module tree mirrors BlinkDL's checkpoint keys exactly (`blocks.3.att.key.weight`, `blocks.0.ln0.bias`, ...), so a
checkpoint loads with a strict `load_state_dict`, `peft` finds the projections by their checkpoint names, and a merged
state dict is saved back without any renaming.

The recurrent state is an `RNNState` (finetune/models/family.py), float32:
    att_shift [B, L, C]     the last ln1 output seen by the time-mix
    wkv       [B, L, 3, C]  the WKV numerator a, denominator b and running max p (true numerator a * e^p; p = -1e38
                            when empty)
    ffn_shift [B, L, C]     the last ln2 output seen by the channel-mix
Layer l is the `rwkv` pip package's list `state[5*l + 0..4]` = (att_shift, a, b, p, ffn_shift) with a batch
dimension in front. (For dim_att != n_embd the WKV rows would not fit; every published RWKV-4 has dim_att == n_embd.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from finetune.models.family import Family, RNNState, RWKVModel, as_dtype, block_count, dims
from finetune.ops.wkv4 import P_EMPTY, wkv, wkv_step

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


def token_shift(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Each position's previous input: the carried `shift` [B, C] at t = 0, then x[:, :-1]. (B, T, C)"""
    if x.shape[1] == 1:  # one-token steps: no concatenation
        return shift.to(x.dtype).unsqueeze(1)
    return torch.cat([shift.to(x.dtype).unsqueeze(1), x[:, :-1]], dim=1)


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

    def forward(self, x: torch.Tensor, shift: torch.Tensor, wkv_state: torch.Tensor):
        """x [B, T, C] (ln1 output), shift [B, C], wkv_state [B, 3, C] -> (out, new shift, new wkv_state)."""
        # x * mix + xx * (1 - mix), written as xx + (x - xx) * mix: one subtraction shared by the three mixes
        xx = token_shift(x, shift)
        dx = x - xx
        xk = xx + dx * self.time_mix_k
        xv = xx + dx * self.time_mix_v
        xr = xx + dx * self.time_mix_r
        k = self.key(xk)
        v = self.value(xv)
        r = torch.sigmoid(self.receptance(xr))
        if k.dtype == torch.float16:  # the kernels take fp32/bf16; the state is fp32 either way
            k, v = k.float(), v.float()
        if x.shape[1] == 1 and not torch.is_grad_enabled():
            # generation: one step of the same recurrence on [B, C] vectors, without the kernel's call overhead
            a, b, p = wkv_state.unbind(1)
            y, a, b, p = wkv_step(-torch.exp(self.time_decay.float()), self.time_first.float(), k[:, 0].float(),
                                  v[:, 0].float(), a, b, p)
            y, wkv_state = y.unsqueeze(1), torch.stack([a, b, p], dim=1)
        else:
            y, wkv_state = wkv(self.time_decay, self.time_first, k, v, wkv_state)
        # the shift is a copy: a view would keep the whole [B, T, C] input alive as long as the state
        return self.output(r * y.to(r.dtype)), x[:, -1].clone(), wkv_state


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
        xx = token_shift(x, shift)
        dx = x - xx
        xk = xx + dx * self.time_mix_k
        xr = xx + dx * self.time_mix_r
        k = torch.square(torch.relu(self.key(xk)))
        return torch.sigmoid(self.receptance(xr)) * self.value(k), x[:, -1].clone()


class Block(nn.Module):
    def __init__(self, config: RWKVConfig, layer_id: int) -> None:
        super().__init__()
        C = config.n_embd
        self.layer_id = layer_id
        self.first = layer_id == 0  # what forward branches on: under torch.compile blocks 1..L-1 share one graph
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(C)  # block 0 only: normalises the embedding
        self.ln1 = nn.LayerNorm(C)
        self.ln2 = nn.LayerNorm(C)
        self.att = TimeMix(config)
        self.ffn = ChannelMix(config)

    def forward(self, x: torch.Tensor, att_shift: torch.Tensor, wkv_state: torch.Tensor, ffn_shift: torch.Tensor):
        """x [B, T, C] and this layer's state pieces -> (x, att_shift, wkv_state, ffn_shift) after the window."""
        if self.first:
            x = self.ln0(as_dtype(x, self.ln0.weight.dtype))  # see as_dtype: a trained fp32 emb, bf16 ln0
        dx, att_shift, wkv_state = self.att(self.ln1(x), att_shift, wkv_state)
        x = x + dx
        dx, ffn_shift = self.ffn(self.ln2(x), ffn_shift)
        return x + dx, att_shift, wkv_state, ffn_shift


class RWKV(RWKVModel):
    fp32_params = FP32_PARAMS

    def __init__(self, config: RWKVConfig) -> None:
        super().__init__(config, Block)

    def zero_state(self, batch: int, device: torch.device | str) -> RNNState:
        """Zeros, with the WKV running max p at -1e38."""
        L, C = self.config.n_layer, self.config.n_embd
        wkv_state = torch.zeros(batch, L, 3, C, device=device)
        wkv_state[:, :, 2] = P_EMPTY
        return RNNState(torch.zeros(batch, L, C, device=device), wkv_state, torch.zeros(batch, L, C, device=device))



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
    vocab, n_embd = dims(sd, "emb.weight", 2, path, "RWKV-4")
    n_layer = block_count(sd, path, "RWKV-4")
    dim_ffn = dims(sd, "blocks.0.ffn.key.weight", 2, path, "RWKV-4")[0]
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


class PrefixWKV(nn.Module):
    """State tuning's WKV part for RWKV-4: per layer a "virtual prefix" of value `a` and log-weight `p`.

    Written as (a, b=1, p): numerator a*e^p, denominator e^p, i.e. a prefix whose weighted mean value is a and whose
    total weight is e^p. That keeps the denominator positive whatever the optimiser does. At initialisation a is 0
    and p = init_log_weight (a faint prefix): the model starts almost exactly as the base, and Adam's step size does
    not depend on how faint it is.
    """

    def __init__(self, config: RWKVConfig, init_log_weight: float = -5.0) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.zeros(config.n_layer, config.n_embd))
        self.log_weight = nn.Parameter(torch.full((config.n_layer, config.n_embd), float(init_log_weight)))

    def forward(self) -> torch.Tensor:
        """The WKV start state [L, 3, C] (rows a, b, p)."""
        return torch.stack([self.value, torch.ones_like(self.value), self.log_weight], dim=1)


def _is_time(name: str) -> bool:
    return ".att.time_" in name or ".ffn.time_" in name


def _is_ln(name: str) -> bool:
    return ".ln0." in name or ".ln1." in name or ".ln2." in name or name.startswith("ln_out.")


FAMILY = Family(
    name="rwkv4",
    title="RWKV-4",
    model_class=RWKV,
    config_class=RWKVConfig,
    config_from_state_dict=config_from_state_dict,
    expected_shapes=expected_shapes,
    init=init_rwkv_lm_,
    lora_parts={"att": ("key", "value", "receptance", "output"), "ffn": ("key", "value", "receptance")},
    full_groups={"time": _is_time, "ln": _is_ln, "emb": lambda n: n == "emb.weight",
                 "head": lambda n: n == "head.weight"},
    fp32_params=FP32_PARAMS,
    describe=lambda config: [f"width:       {config.n_embd} (ffn {config.dim_ffn})"],
    state_tune=PrefixWKV,
)
