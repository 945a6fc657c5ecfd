"""RWKV-5.2 ("Eagle", the World v2 models) as one plain `nn.Module`, for training, prefill and generation alike.

The module tree is the checkpoint's key layout (`blocks.3.att.gate.weight`, `blocks.0.ln0.bias`, ...), so a BlinkDL
`.pth` loads with a strict `load_state_dict`, peft finds the projections by their checkpoint names, and a merged
state dict is saved back without renaming.

Per block (x = the residual stream, C = n_embd = H * N, H heads of size N):

    time-mix      xa = ln1(x); prev = the previous token's xa (the carried att_shift at t = 0)
                  x_m = xa * time_mix_m + prev * (1 - time_mix_m)           for m in k, v, r, g
                  r, k, v = receptance(x_r), key(x_k), value(x_v); g = silu(gate(x_g))
                  y = WKV(r, w = -exp(time_decay), k, v, u = time_faaaa)    per head, state S [N, N]
                  x += output(GroupNorm_H(y) * g)
    channel-mix   xf = ln2(x); prev = the previous token's xf (the carried ffn_shift at t = 0)
                  x += sigmoid(receptance(x_r)) * value(relu(key(x_k)) ** 2)

WKV per head (`finetune.ops.wkv6`): y_t = r_t @ (u * k_t^T v_t + S); S = k_t^T v_t + exp(w) * S, with S's rows indexed
by the key and its columns by the value (the `rwkv` package's v5/v6 layout, so states compare directly). RWKV-5.2's
decay is fixed per channel: the model broadcasts it over the tokens.

The state (`RNNState`): att_shift [B, L, C], wkv [B, L, H, N, N], ffn_shift [B, L, C], all float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from finetune.errors import FinetuneError
from finetune.models.family import Family, RWKVModel, as_dtype, block_count, dims
from finetune.ops.wkv6 import wkv6

# Kept float32 whatever dtype the rest of the model is cast to. time_decay enters exp(-exp(.)) and the decay is raised
# to the power of the distance in the state, so a rounded decay drifts further with every token; time_faaaa (the
# bonus u) multiplies the fp32 state update directly. ln_x is the GroupNorm over the fp32 WKV output, which the `rwkv`
# package also runs in fp32. All three are tiny (C or 2C numbers per layer).
FP32_PARAMS = ("att.time_decay", "att.time_faaaa", "att.ln_x.weight", "att.ln_x.bias")

LN_X_EPS = 64e-5
"""GroupNorm eps of ln_x: RWKV-LM divides by head_size_divisor = 8 and uses eps 1e-5, the same as eps 1e-5 * 8**2."""


@dataclass
class RWKV5Config:
    n_layer: int
    """Number of blocks."""
    n_embd: int
    """Width C of the residual stream (= n_head * head_size in every published model)."""
    vocab_size: int
    """Rows of emb.weight and head.weight (65536 for World)."""
    head_size: int = 64
    """Head size N (64 in every published model); the number of heads is n_embd // head_size."""
    dim_ffn: int | None = None
    """Hidden width of the channel-mix; RWKV-LM's default 3.5 * n_embd rounded down to a multiple of 32 when None."""

    def __post_init__(self) -> None:
        if self.n_embd % self.head_size:
            raise FinetuneError(f"n_embd {self.n_embd} is not a multiple of the head size {self.head_size}")
        if self.dim_ffn is None:
            self.dim_ffn = default_dim_ffn(self.n_embd)

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size


def default_dim_ffn(n_embd: int) -> int:
    """RWKV-LM's default channel-mix width for v5/v6: 3.5 C rounded down to a multiple of 32 (at least 32)."""
    return max(32, int(n_embd * 3.5) // 32 * 32)


def token_shift(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """The previous token's input at every position: x [B, T, C], shift [B, C] (the last input of the previous call)
    -> [B, T, C]."""
    if x.shape[1] == 1:  # one-token step: nothing to slice
        return shift.to(x.dtype).unsqueeze(1)
    return torch.cat([shift.to(x.dtype).unsqueeze(1), x[:, :-1]], dim=1)


class TimeMix(nn.Module):
    """The attention-like sub-block: token shift, r/k/v/g projections, multi-head WKV, GroupNorm, gated output."""

    def __init__(self, config: RWKV5Config) -> None:
        super().__init__()
        C, H, N = config.n_embd, config.n_head, config.head_size
        self.n_head, self.head_size = H, N
        self.time_mix_k = nn.Parameter(torch.ones(1, 1, C))
        self.time_mix_v = nn.Parameter(torch.ones(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.ones(1, 1, C))
        self.time_mix_g = nn.Parameter(torch.ones(1, 1, C))
        self.time_decay = nn.Parameter(torch.zeros(H, N))  # raw: the per-token decay is exp(-exp(time_decay))
        self.time_faaaa = nn.Parameter(torch.zeros(H, N))  # the bonus u given to the current token
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.gate = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=LN_X_EPS)

    def forward(self, x: torch.Tensor, shift: torch.Tensor,
                wkv_state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, C] (ln1 output), shift [B, C], wkv_state [B, H, N, N] -> (dx [B, T, C], new shift, new state)."""
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        prev = token_shift(x, shift)
        # lerp(prev, x, mix) = x * mix + prev * (1 - mix) in one op (fewer ops per generated token)
        xk = torch.lerp(prev, x, as_dtype(self.time_mix_k, x.dtype))
        xv = torch.lerp(prev, x, as_dtype(self.time_mix_v, x.dtype))
        xr = torch.lerp(prev, x, as_dtype(self.time_mix_r, x.dtype))
        xg = torch.lerp(prev, x, as_dtype(self.time_mix_g, x.dtype))
        # r, k, v reach the WKV in the model's dtype (fp16 as fp32); it computes and keeps its state in fp32
        r = self.receptance(xr).view(B, T, H, N)  # (B, T, H, N)
        k = self.key(xk).view(B, T, H, N)
        v = self.value(xv).view(B, T, H, N)
        g = F.silu(self.gate(xg))
        if r.dtype == torch.float16:  # the compiled WKV kernels take fp32/bf16 (they compute in fp32 either way)
            r, k, v = r.float(), k.float(), v.float()
        log_decay = -torch.exp(self.time_decay.float())  # (H, N): fixed per channel in v5.2
        u = self.time_faaaa.float()
        if T == 1:
            # generation: one step of the recurrence (the operator's formula) without the operator's dispatch
            r, k, v = r[:, 0].float(), k[:, 0].float(), v[:, 0].float()  # (B, H, N)
            kv = k.unsqueeze(-1) * v.unsqueeze(-2)  # (B, H, N, N): k^T v, rows = key index
            # addcmul: one pass over each [N, N] matrix instead of two (this path is memory-bound)
            y = (r.unsqueeze(-2) @ torch.addcmul(wkv_state, u.unsqueeze(-1), kv)).view(B, 1, C)  # r @ (S + u k^T v)
            wkv_state = torch.addcmul(kv, torch.exp(log_decay).unsqueeze(-1), wkv_state)  # k^T v + decay * S
        else:
            y, wkv_state = wkv6(r, log_decay.expand(B, T, H, N), k, v, u, wkv_state)  # y (B, T, H, N) fp32
            y = y.reshape(B, T, C)
        # GroupNorm over each head's N channels, in fp32 (ln_x stays fp32 unless the model was cast around `cast`)
        y = self.ln_x(y.view(B * T, C).to(self.ln_x.weight.dtype)).view(B, T, C)
        # the shift is a copy: a view would keep the whole [B, T, C] input alive as long as the state
        return self.output(y.to(g.dtype) * g), x[:, -1].clone(), wkv_state


class ChannelMix(nn.Module):
    """The feed-forward sub-block: token shift, squared-ReLU MLP gated by a sigmoid receptance."""

    def __init__(self, config: RWKV5Config) -> None:
        super().__init__()
        C, F_ = config.n_embd, config.dim_ffn
        self.time_mix_k = nn.Parameter(torch.ones(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.ones(1, 1, C))
        self.key = nn.Linear(C, F_, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(F_, C, bias=False)

    def forward(self, x: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, C] (ln2 output), shift [B, C] -> (dx [B, T, C], new shift)."""
        prev = token_shift(x, shift)
        xk = torch.lerp(prev, x, as_dtype(self.time_mix_k, x.dtype))  # x * mix + prev * (1 - mix)
        xr = torch.lerp(prev, x, as_dtype(self.time_mix_r, x.dtype))
        k = torch.square(torch.relu(self.key(xk)))
        return torch.sigmoid(self.receptance(xr)) * self.value(k), x[:, -1].clone()


class Block(nn.Module):
    def __init__(self, config: RWKV5Config, layer_id: int) -> None:
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

    def forward(self, x: torch.Tensor, att_shift: torch.Tensor, wkv_state: torch.Tensor,
                ffn_shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, C] and this layer's state -> (x, att_shift [B, C], wkv [B, H, N, N], ffn_shift [B, C])."""
        if self.first:
            x = self.ln0(as_dtype(x, self.ln0.weight.dtype))  # see as_dtype: a trained fp32 emb, bf16 ln0
        dx, att_shift, wkv_state = self.att(self.ln1(x), att_shift, wkv_state)
        x = x + dx
        dx, ffn_shift = self.ffn(self.ln2(x), ffn_shift)
        return x + dx, att_shift, wkv_state, ffn_shift


class RWKV5(RWKVModel):
    fp32_params = FP32_PARAMS

    def __init__(self, config: RWKV5Config) -> None:
        super().__init__(config, Block)


# ----------------------------------------------------------------------------------------------------------------------
# Initialisation (RWKV-LM's x052 scheme), used by `rwkv-lora init --arch 5`


@torch.no_grad()
def init_rwkv_lm_(model: RWKV5, seed: int = 0) -> RWKV5:
    """Initialise in place the way RWKV-LM (RWKV-v5/src/model.py, x052 + generate_init_weight) does.

    Token-shift mixes ramped by channel and by layer; decays spread from fast (-6) to slow (-1) over the channels,
    steeper in later layers; a bonus falling over the channels in later layers plus a small zigzag; ln_x scaled up
    with depth; a tiny uniform embedding; orthogonal matrices, with att.key and att.gate at gain 0.1 and att.output,
    ffn.value, ffn.receptance zero (each block starts as the identity); head orthogonal at 0.5 * sqrt(V / C).
    """
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    C, L, H, N = cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.head_size
    ddd = (torch.arange(C, dtype=torch.float64) / C).view(1, 1, C)  # 0 .. (C-1)/C over the channels
    n = torch.arange(C, dtype=torch.float64) / max(C - 1, 1)  # 0 .. 1 over the channels
    zigzag = torch.tensor([((j + 1) % 3 - 1) * 0.1 for j in range(C)], dtype=torch.float64)
    for i, block in enumerate(model.blocks):
        ratio_0_to_1 = i / max(L - 1, 1)
        ratio_1_to_almost0 = 1.0 - i / L
        att, ffn = block.att, block.ffn
        att.time_mix_k.copy_(ddd.pow(ratio_1_to_almost0))
        att.time_mix_v.copy_(ddd.pow(ratio_1_to_almost0) + 0.3 * ratio_0_to_1)
        att.time_mix_r.copy_(ddd.pow(0.5 * ratio_1_to_almost0))
        att.time_mix_g.copy_(ddd.pow(0.5 * ratio_1_to_almost0))
        att.time_decay.copy_((-6 + 5 * n.pow(0.7 + 1.3 * ratio_0_to_1)).view(H, N))
        att.time_faaaa.copy_((ratio_0_to_1 * (1 - n) + zigzag).view(H, N))
        att.ln_x.weight.fill_(((1 + i) / L) ** 0.7)
        att.ln_x.bias.zero_()
        ffn.time_mix_k.copy_(ddd.pow(ratio_1_to_almost0))
        ffn.time_mix_r.copy_(ddd.pow(ratio_1_to_almost0))
    init_matrices_(model, gen)
    return model


@torch.no_grad()
def init_matrices_(model: nn.Module, gen: torch.Generator) -> None:
    """RWKV-LM's generate_init_weight for everything but the time_* parameters and ln_x (set by the caller): layer
    norms 1/0, emb uniform(+-1e-4), head orthogonal, projections orthogonal at gain 1, 0.1 or 0 by name."""
    vocab, n_embd = model.head.weight.shape
    for name, p in model.named_parameters():
        if ".time_" in name or ".ln_x." in name:
            continue
        if ".ln" in name or name.startswith("ln_out."):
            p.fill_(1.0) if name.endswith(".weight") else p.zero_()
        elif name == "emb.weight":
            p.uniform_(-1e-4, 1e-4, generator=gen)
        elif name == "head.weight":
            nn.init.orthogonal_(p, gain=0.5 * math.sqrt(vocab / n_embd) if vocab > n_embd else 0.5, generator=gen)
        elif any(z in name for z in (".att.output.", ".ffn.value.", ".ffn.receptance.")):
            p.zero_()
        else:
            gain = 0.1 if (".att.key." in name or ".att.gate." in name) else 1.0
            nn.init.orthogonal_(p, gain=gain, generator=gen)


# ----------------------------------------------------------------------------------------------------------------------
# The checkpoint layout


def config_from_state_dict(sd: dict[str, torch.Tensor], path: str | Path = "<memory>") -> RWKV5Config:
    """Layers, width, heads, head size, vocab and ffn width, read off the tensors' shapes (meta tensors work too)."""
    vocab, n_embd = dims(sd, "emb.weight", 2, path, "RWKV-5.2")
    n_layer = block_count(sd, path, "RWKV-5.2")
    n_head, head_size = dims(sd, "blocks.0.att.time_faaaa", 2, path, "RWKV-5.2")
    dim_ffn = dims(sd, "blocks.0.ffn.key.weight", 2, path, "RWKV-5.2")[0]
    if n_head * head_size != n_embd:
        raise FinetuneError(f"{path}: blocks.0.att.time_faaaa is [{n_head}, {head_size}] but the width is {n_embd} "
                            f"(heads x head size must equal it)")
    return RWKV5Config(n_layer=n_layer, n_embd=n_embd, vocab_size=vocab, head_size=head_size, dim_ffn=dim_ffn)


def expected_shapes(config: RWKV5Config) -> dict[str, tuple[int, ...]]:
    """Every key of an RWKV-5.2 checkpoint with its shape."""
    C, V, F_, H, N = config.n_embd, config.vocab_size, config.dim_ffn, config.n_head, config.head_size
    shapes: dict[str, tuple[int, ...]] = {"emb.weight": (V, C), "blocks.0.ln0.weight": (C,),
                                          "blocks.0.ln0.bias": (C,)}
    for i in range(config.n_layer):
        b = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            shapes[f"{b}{ln}.weight"] = (C,)
            shapes[f"{b}{ln}.bias"] = (C,)
        for m in ("k", "v", "r", "g"):
            shapes[f"{b}att.time_mix_{m}"] = (1, 1, C)
        shapes[f"{b}att.time_decay"] = (H, N)
        shapes[f"{b}att.time_faaaa"] = (H, N)
        for m in ("receptance", "key", "value", "gate", "output"):
            shapes[f"{b}att.{m}.weight"] = (C, C)
        shapes[f"{b}att.ln_x.weight"] = (C,)
        shapes[f"{b}att.ln_x.bias"] = (C,)
        shapes[f"{b}ffn.time_mix_k"] = (1, 1, C)
        shapes[f"{b}ffn.time_mix_r"] = (1, 1, C)
        shapes[f"{b}ffn.key.weight"] = (F_, C)
        shapes[f"{b}ffn.receptance.weight"] = (C, C)
        shapes[f"{b}ffn.value.weight"] = (C, F_)
    shapes["ln_out.weight"] = (C,)
    shapes["ln_out.bias"] = (C,)
    shapes["head.weight"] = (V, C)
    return shapes


def _is_time(name: str) -> bool:
    return ".att.time_" in name or ".ffn.time_" in name


def _is_ln(name: str) -> bool:
    return any(f".{ln}." in name for ln in ("ln0", "ln1", "ln2", "ln_x")) or name.startswith("ln_out.")


FAMILY = Family(
    name="rwkv5",
    title="RWKV-5.2 (Eagle)",
    model_class=RWKV5,
    config_class=RWKV5Config,
    config_from_state_dict=config_from_state_dict,
    expected_shapes=expected_shapes,
    init=init_rwkv_lm_,
    lora_parts={"att": ("receptance", "key", "value", "gate", "output"), "ffn": ("key", "receptance", "value")},
    full_groups={"time": _is_time, "ln": _is_ln, "emb": lambda n: n == "emb.weight",
                 "head": lambda n: n == "head.weight"},
    fp32_params=FP32_PARAMS,
    describe=lambda config: [f"width:       {config.n_embd} (ffn {config.dim_ffn})",
                             f"heads:       {config.n_head} x {config.head_size}"],
    time_state_transposed=True,  # RWKV-Runner's loader and the package transpose v5/v6 time_state files
)
