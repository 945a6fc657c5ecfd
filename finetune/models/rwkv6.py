"""RWKV-6 ("Finch", the World v2.1 / v3 models) as one plain `nn.Module`, for training, prefill and generation alike.

The module tree is the checkpoint's key layout (`blocks.3.att.time_maa_w1`, `blocks.0.ln0.bias`, ...), so a BlinkDL
`.pth` loads with a strict `load_state_dict`, peft finds the projections by their checkpoint names, and a merged
state dict is saved back without renaming.

Per block (x = the residual stream, C = n_embd = H * N, H heads of size N):

    time-mix      xa = ln1(x); xx = the previous token's xa (the carried att_shift at t = 0) minus xa
                  m_w, m_k, m_v, m_r, m_g = tanh((xa + xx * time_maa_x) @ time_maa_w1) @ time_maa_w2   (low rank, 5 at once)
                  x_m = xa + xx * (time_maa_m + m_m)                                     for m in w, k, v, r, g
                  r, k, v = receptance(x_r), key(x_k), value(x_v); g = silu(gate(x_g))
                  w = -exp(time_decay + tanh(x_w @ time_decay_w1) @ time_decay_w2)      log decay, per token
                  y = WKV(r, w, k, v, u = time_faaaa)                                    per head, state S [N, N]
                  x += output(GroupNorm_H(y) * g)
    channel-mix   xf = ln2(x); xx = the previous token's xf (the carried ffn_shift at t = 0) minus xf
                  x += sigmoid(receptance(xf + xx * time_maa_r)) * value(relu(key(xf + xx * time_maa_k)) ** 2)

WKV per head (`finetune.ops.wkv6`): y_t = r_t @ (u * k_t^T v_t + S); S = k_t^T v_t + exp(w_t) * S, with S's rows
indexed by the key and its columns by the value (the `rwkv` package's v5/v6 layout, so states compare directly).

The state (`RNNState`): att_shift [B, L, C], wkv [B, L, H, N, N], ffn_shift [B, L, C], all float32. RWKV-6 shares
RWKV-5.2's token shift, matrix initialisation and state-file layout: those helpers are imported from `rwkv5`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from finetune.errors import FinetuneError
from finetune.models.family import Family, RWKVModel, as_dtype, block_count, dims
from finetune.models.rwkv5 import LN_X_EPS, default_dim_ffn, init_matrices_, token_shift
from finetune.ops.wkv6 import wkv6

__all__ = ["RWKV6", "RWKV6Config", "FAMILY", "config_from_state_dict", "expected_shapes", "init_rwkv_lm_"]

# Kept float32 whatever dtype the rest of the model is cast to: the whole decay path (time_decay and its low-rank
# time_decay_w1/w2) because it enters exp(-exp(.)) and the decay is raised to the power of the distance in the state,
# so a rounded decay drifts further with every token (the two low-rank matrices are C x 64 and cost nothing in fp32);
# time_faaaa (the bonus u) multiplies the fp32 state update; ln_x is the GroupNorm over the fp32 WKV output, which the
# `rwkv` package also runs in fp32.
FP32_PARAMS = ("att.time_decay", "att.time_decay_w1", "att.time_decay_w2", "att.time_faaaa", "att.ln_x.weight",
               "att.ln_x.bias")


@dataclass
class RWKV6Config:
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
    d_mix: int = 32
    """Rank of the data-dependent token-shift mixes (time_maa_w1 is [C, 5 * d_mix]); RWKV-LM's x060 uses 32."""
    d_decay: int = 64
    """Rank of the data-dependent decay (time_decay_w1 is [C, d_decay]); RWKV-LM's x060 uses 64."""

    def __post_init__(self) -> None:
        if self.n_embd % self.head_size:
            raise FinetuneError(f"n_embd {self.n_embd} is not a multiple of the head size {self.head_size}")
        if self.dim_ffn is None:
            self.dim_ffn = default_dim_ffn(self.n_embd)

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size


class TimeMix(nn.Module):
    """The attention-like sub-block: data-dependent token shift, r/k/v/g projections, per-token decays, multi-head
    WKV, GroupNorm, gated output."""

    def __init__(self, config: RWKV6Config) -> None:
        super().__init__()
        C, H, N, D = config.n_embd, config.n_head, config.head_size, config.d_mix
        self.n_head, self.head_size = H, N
        self.time_maa_x = nn.Parameter(torch.zeros(1, 1, C))
        self.time_maa_w = nn.Parameter(torch.zeros(1, 1, C))
        self.time_maa_k = nn.Parameter(torch.zeros(1, 1, C))
        self.time_maa_v = nn.Parameter(torch.zeros(1, 1, C))
        self.time_maa_r = nn.Parameter(torch.zeros(1, 1, C))
        self.time_maa_g = nn.Parameter(torch.zeros(1, 1, C))
        self.time_maa_w1 = nn.Parameter(torch.zeros(C, 5 * D))
        self.time_maa_w2 = nn.Parameter(torch.zeros(5, D, C))
        self.time_decay = nn.Parameter(torch.zeros(1, 1, C))  # raw: the decay is exp(-exp(time_decay + lora))
        self.time_decay_w1 = nn.Parameter(torch.zeros(C, config.d_decay))
        self.time_decay_w2 = nn.Parameter(torch.zeros(config.d_decay, C))
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
        xx = token_shift(x, shift) - x
        # the five mixes' data-dependent parts from one low-rank projection, in the order w, k, v, r, g
        m = torch.tanh(torch.addcmul(x, xx, self.time_maa_x) @ self.time_maa_w1)  # (B, T, 5 * D)
        m = m.view(B * T, 5, -1).transpose(0, 1)  # (5, B*T, D)
        m = torch.bmm(m, self.time_maa_w2).view(5, B, T, C)  # (5, B, T, C): chunk i times time_maa_w2[i]
        mw, mk, mv, mr, mg = m.unbind(0)
        xw = torch.addcmul(x, xx, self.time_maa_w + mw)  # x + xx * (maa_w + m_w)
        xk = torch.addcmul(x, xx, self.time_maa_k + mk)
        xv = torch.addcmul(x, xx, self.time_maa_v + mv)
        xr = torch.addcmul(x, xx, self.time_maa_r + mr)
        xg = torch.addcmul(x, xx, self.time_maa_g + mg)
        r = self.receptance(xr).view(B, T, H, N)  # (B, T, H, N)
        k = self.key(xk).view(B, T, H, N)
        v = self.value(xv).view(B, T, H, N)
        g = F.silu(self.gate(xg))
        if r.dtype == torch.float16:  # the compiled WKV kernels take fp32/bf16 (they compute in fp32 either way)
            r, k, v = r.float(), k.float(), v.float()
        # per-token log decay, in fp32 throughout (see FP32_PARAMS)
        ww = torch.tanh(xw.float() @ self.time_decay_w1.float()) @ self.time_decay_w2.float()  # (B, T, C)
        log_decay = -torch.exp(self.time_decay.float() + ww).view(B, T, H, N)  # (B, T, H, N)
        u = self.time_faaaa.float()
        if T == 1:
            # generation: one step of the recurrence (the operator's formula) without the operator's dispatch
            r, k, v = r[:, 0].float(), k[:, 0].float(), v[:, 0].float()  # (B, H, N)
            kv = k.unsqueeze(-1) * v.unsqueeze(-2)  # (B, H, N, N): k^T v, rows = key index
            # addcmul: one pass over each [N, N] matrix instead of two (this path is memory-bound)
            y = (r.unsqueeze(-2) @ torch.addcmul(wkv_state, u.unsqueeze(-1), kv)).view(B, 1, C)  # r @ (S + u k^T v)
            wkv_state = torch.addcmul(kv, torch.exp(log_decay[:, 0]).unsqueeze(-1), wkv_state)  # k^T v + decay * S
        else:
            y, wkv_state = wkv6(r, log_decay, k, v, u, wkv_state)  # y (B, T, H, N) fp32
            y = y.reshape(B, T, C)
        # GroupNorm over each head's N channels, in fp32 (ln_x stays fp32 unless the model was cast around `cast`)
        y = self.ln_x(y.view(B * T, C).to(self.ln_x.weight.dtype)).view(B, T, C)
        # the shift is a copy: a view would keep the whole [B, T, C] input alive as long as the state
        return self.output(y.to(g.dtype) * g), x[:, -1].clone(), wkv_state


class ChannelMix(nn.Module):
    """The feed-forward sub-block: token shift, squared-ReLU MLP gated by a sigmoid receptance."""

    def __init__(self, config: RWKV6Config) -> None:
        super().__init__()
        C, F_ = config.n_embd, config.dim_ffn
        self.time_maa_k = nn.Parameter(torch.zeros(1, 1, C))
        self.time_maa_r = nn.Parameter(torch.zeros(1, 1, C))
        self.key = nn.Linear(C, F_, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(F_, C, bias=False)

    def forward(self, x: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, C] (ln2 output), shift [B, C] -> (dx [B, T, C], new shift)."""
        xx = token_shift(x, shift) - x
        k = torch.square(torch.relu(self.key(torch.addcmul(x, xx, self.time_maa_k))))  # x + xx * maa_k
        r = torch.sigmoid(self.receptance(torch.addcmul(x, xx, self.time_maa_r)))
        return r * self.value(k), x[:, -1].clone()


class Block(nn.Module):
    def __init__(self, config: RWKV6Config, layer_id: int) -> None:
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


class RWKV6(RWKVModel):
    fp32_params = FP32_PARAMS

    def __init__(self, config: RWKV6Config) -> None:
        super().__init__(config, Block)


# ----------------------------------------------------------------------------------------------------------------------
# Initialisation (RWKV-LM's x060 scheme), used by `rwkv-lora init --arch 6`


@torch.no_grad()
def init_rwkv_lm_(model: RWKV6, seed: int = 0) -> RWKV6:
    """Initialise in place the way RWKV-LM (RWKV-v5/src/model.py, x060 + generate_init_weight) does.

    Token-shift mixes ramped by channel and by layer (the x052 ramps written as 1 - mix for the x + xx * maa form);
    the low-rank mix and decay paths start with w1 = 0 and a small uniform w2 (so they start flat but train); decays
    spread from fast (-6) to slow (-1) over the channels, steeper in later layers; a falling bonus plus a zigzag;
    ln_x scaled up with depth; the matrices as in RWKV-5.2 (`rwkv5.init_matrices_`).
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
        att.time_maa_x.copy_(1.0 - ddd.pow(ratio_1_to_almost0))
        att.time_maa_w.copy_(1.0 - ddd.pow(ratio_1_to_almost0))
        att.time_maa_k.copy_(1.0 - ddd.pow(ratio_1_to_almost0))
        att.time_maa_v.copy_(1.0 - (ddd.pow(ratio_1_to_almost0) + 0.3 * ratio_0_to_1))
        att.time_maa_r.copy_(1.0 - ddd.pow(0.5 * ratio_1_to_almost0))
        att.time_maa_g.copy_(1.0 - ddd.pow(0.5 * ratio_1_to_almost0))
        att.time_maa_w1.zero_()
        att.time_maa_w2.uniform_(-0.01, 0.01, generator=gen)
        att.time_decay.copy_((-6 + 5 * n.pow(0.7 + 1.3 * ratio_0_to_1)).view(1, 1, C))
        att.time_decay_w1.zero_()
        att.time_decay_w2.uniform_(-0.01, 0.01, generator=gen)
        att.time_faaaa.copy_((ratio_0_to_1 * (1 - n) + zigzag).view(H, N))
        att.ln_x.weight.fill_(((1 + i) / L) ** 0.7)
        att.ln_x.bias.zero_()
        ffn.time_maa_k.copy_(1.0 - ddd.pow(ratio_1_to_almost0 ** 3))
        ffn.time_maa_r.copy_(1.0 - ddd.pow(ratio_1_to_almost0 ** 3))
    init_matrices_(model, gen)
    return model


# ----------------------------------------------------------------------------------------------------------------------
# The checkpoint layout


def config_from_state_dict(sd: dict[str, torch.Tensor], path: str | Path = "<memory>") -> RWKV6Config:
    """Layers, width, heads, head size, vocab, ffn width and the low-rank widths, read off the tensors' shapes (meta
    tensors work too)."""
    vocab, n_embd = dims(sd, "emb.weight", 2, path, "RWKV-6")
    n_layer = block_count(sd, path, "RWKV-6")
    n_head, head_size = dims(sd, "blocks.0.att.time_faaaa", 2, path, "RWKV-6")
    dim_ffn = dims(sd, "blocks.0.ffn.key.weight", 2, path, "RWKV-6")[0]
    d_mix5 = dims(sd, "blocks.0.att.time_maa_w1", 2, path, "RWKV-6")[1]
    d_decay = dims(sd, "blocks.0.att.time_decay_w1", 2, path, "RWKV-6")[1]
    if n_head * head_size != n_embd:
        raise FinetuneError(f"{path}: blocks.0.att.time_faaaa is [{n_head}, {head_size}] but the width is {n_embd} "
                            f"(heads x head size must equal it)")
    if d_mix5 % 5:
        raise FinetuneError(f"{path}: blocks.0.att.time_maa_w1 has {d_mix5} columns, not 5 x the mix rank")
    return RWKV6Config(n_layer=n_layer, n_embd=n_embd, vocab_size=vocab, head_size=head_size, dim_ffn=dim_ffn,
                       d_mix=d_mix5 // 5, d_decay=d_decay)


def expected_shapes(config: RWKV6Config) -> dict[str, tuple[int, ...]]:
    """Every key of an RWKV-6 checkpoint with its shape."""
    C, V, F_, H, N = config.n_embd, config.vocab_size, config.dim_ffn, config.n_head, config.head_size
    shapes: dict[str, tuple[int, ...]] = {"emb.weight": (V, C), "blocks.0.ln0.weight": (C,),
                                          "blocks.0.ln0.bias": (C,)}
    for i in range(config.n_layer):
        b = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            shapes[f"{b}{ln}.weight"] = (C,)
            shapes[f"{b}{ln}.bias"] = (C,)
        for m in ("x", "w", "k", "v", "r", "g"):
            shapes[f"{b}att.time_maa_{m}"] = (1, 1, C)
        shapes[f"{b}att.time_maa_w1"] = (C, 5 * config.d_mix)
        shapes[f"{b}att.time_maa_w2"] = (5, config.d_mix, C)
        shapes[f"{b}att.time_decay"] = (1, 1, C)
        shapes[f"{b}att.time_decay_w1"] = (C, config.d_decay)
        shapes[f"{b}att.time_decay_w2"] = (config.d_decay, C)
        shapes[f"{b}att.time_faaaa"] = (H, N)
        for m in ("receptance", "key", "value", "gate", "output"):
            shapes[f"{b}att.{m}.weight"] = (C, C)
        shapes[f"{b}att.ln_x.weight"] = (C,)
        shapes[f"{b}att.ln_x.bias"] = (C,)
        shapes[f"{b}ffn.time_maa_k"] = (1, 1, C)
        shapes[f"{b}ffn.time_maa_r"] = (1, 1, C)
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
    name="rwkv6",
    title="RWKV-6 (Finch)",
    model_class=RWKV6,
    config_class=RWKV6Config,
    config_from_state_dict=config_from_state_dict,
    expected_shapes=expected_shapes,
    init=init_rwkv_lm_,
    lora_parts={"att": ("receptance", "key", "value", "gate", "output"), "ffn": ("key", "receptance", "value")},
    full_groups={"time": _is_time, "ln": _is_ln, "emb": lambda n: n == "emb.weight",
                 "head": lambda n: n == "head.weight"},
    fp32_params=FP32_PARAMS,
    describe=lambda config: [f"width:       {config.n_embd} (ffn {config.dim_ffn})",
                             f"heads:       {config.n_head} x {config.head_size}",
                             f"low rank:    mix {config.d_mix}, decay {config.d_decay}"],
    time_state_transposed=True,  # RWKV-Runner's loader and the package transpose v5/v6 time_state files
)
