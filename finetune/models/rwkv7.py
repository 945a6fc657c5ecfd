"""RWKV-7 ("Goose", BlinkDL's x070) as one plain `nn.Module`: training, prefill and one-token steps in one forward.

The module tree is the checkpoint's key layout (`blocks.3.att.w1`, `blocks.3.att.receptance.weight`,
`blocks.0.ln0.bias`, ...), so a BlinkDL `.pth` loads with a strict `load_state_dict`, peft finds the projections by
their checkpoint names, and a merged state dict is saved back without renaming.

Notation: B batch, T time, C = n_embd = H * N (H heads of size N), V vocabulary, F = dim_ffn, L layers; Dw, Da, Dv,
Dg the widths of the low-rank decay, in-context-learning-rate, value-residual and gate paths.

One block (x = ln1 output, xx = the previous token's x minus x; the carried shift at t = 0):
    xr..xg = x + xx * x_r .. x + xx * x_g                         token-shift mixes
    r, k, v = receptance(xr), key(xk), value(xv)
    w = w0 + tanh(xw @ w1) @ w2;  log decay = -exp(-0.5) * sigmoid(w)     per channel and token, in (-0.61, 0)
    layer 0: v_first = v;  later: v = v + (v_first - v) * sigmoid(v0 + (xv @ v1) @ v2)    value residual
    a = sigmoid(a0 + (xa @ a1) @ a2)                              in-context learning rate
    g = sigmoid(xg @ g1) @ g2                                      output gate
    kk = L2-normalise(k * k_k) per head;  k = k * (1 + (a - 1) * k_a)
    y = WKV7(r, log decay, k, v, -kk, kk * a)                      (finetune.ops.wkv7)
    out = output((GroupNorm_H(y) + sum_head(r * k * r_k) * v) * g)
and the channel-mix `value(relu(key(x + xx * x_k)) ** 2)`; `x = ln0(emb)` before block 0, `head(ln_out(x))` after.

One token at a time without autograd (generation: `step`), in float32 on the CPU, each block runs `Block.one_token`
instead: the same arithmetic, but everything between the projections (ln1/ln2, the mixes, the four low-rank paths,
the key normalisation, the WKV-7 update, ln_x, bonus and gate) in three compiled calls per layer
(`finetune.ops.rwkv7_step`), while the six projections are still the layers' own nn.Linear modules (so LoRA-wrapped
or quantized ones behave as in `forward`). `RWKV7._one_token_step` decides; anything else (training, float64,
bf16/fp16 weights, several tokens, no compiler) runs the PyTorch path below.

The recurrent state is an `RNNState`: att_shift [B, L, C], wkv [B, L, H, N, N] (row = value index, column = key
index: the `rwkv` package's v7 layout, so states compare with its list `state[3 * l + 1]` directly), ffn_shift
[B, L, C]. `v_first` is layer 0's value at the same position: recomputed by every forward, never part of the state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
import torch.nn as nn
import torch.nn.functional as F

from finetune.errors import FinetuneError
from finetune.models.family import Family, RNNState, RWKVModel, as_dtype, block_count, dims
from finetune.ops.rwkv7_step import step_kernel
from finetune.ops.wkv7 import wkv7

# Kept float32 whatever the model is cast to. w0 is the decay's bias: the per-token log decay is
# -0.61 * sigmoid(w0 + low-rank), and for the slow channels (w0 around -6, decay ~ 1 - 0.0015) a bf16 w0 (spacing
# 1/32 there) would move each channel's memory length by ~3% on load and swallow small training updates. The
# low-rank term is added to it in fp32. Everything else in the decay path is a matmul input (w1, w2) where bf16 is
# the point of bf16; a0/v0/k_k/k_a/r_k feed sigmoids or products where bf16's relative precision is enough.
FP32_PARAMS = ("att.w0",)

LOG_DECAY_SCALE = math.exp(-0.5)
"""log decay = -LOG_DECAY_SCALE * sigmoid(w): every decay lies in (exp(-e^-0.5), 1) = (0.545, 1). (The `rwkv`
package writes the constant as 0.606531, RWKV-LM's kernels as exp(-0.5); they differ by 6e-7 relative.)"""


def low_rank_width(n_embd: int, factor: float) -> int:
    """RWKV-LM's suggested width of a low-rank path: factor * sqrt(C), rounded to a multiple of 32, at least 32
    (decay and in-context rate 2.5, value residual 1.7, gate 5: 64/64/32/128 at C = 768)."""
    return max(32, int(round(factor * n_embd ** 0.5 / 32) * 32))


@dataclass
class RWKV7Config:
    n_layer: int
    """Number of blocks L."""
    n_embd: int
    """Width C of the residual stream (= heads * head_size)."""
    vocab_size: int
    """Rows of emb.weight and head.weight (65536 for World / G1)."""
    head_size: int = 64
    """Head size N (64 in every published model); the number of heads H is n_embd // head_size."""
    dim_ffn: int | None = None
    """Hidden width F of the channel-mix; 4 * n_embd when None (all published RWKV-7 models)."""
    d_decay: int | None = None
    """Width Dw of the low-rank decay path (w1 [C, Dw], w2 [Dw, C]); RWKV-LM's suggestion when None."""
    d_iclr: int | None = None
    """Width Da of the in-context learning rate path (a1, a2)."""
    d_value: int | None = None
    """Width Dv of the value-residual gate (v1, v2)."""
    d_gate: int | None = None
    """Width Dg of the output gate (g1, g2)."""
    layer0_value_mix: bool = True
    """Whether block 0 stores v0/v1/v2. RWKV-LM writes them in every block though block 0 never uses them (it makes
    v_first); some converted checkpoints drop them there."""

    def __post_init__(self) -> None:
        if self.head_size < 1 or self.n_embd % self.head_size:
            raise FinetuneError(f"n_embd {self.n_embd} is not a multiple of the head size {self.head_size}")
        C = self.n_embd
        self.dim_ffn = 4 * C if self.dim_ffn is None else self.dim_ffn
        self.d_decay = low_rank_width(C, 2.5) if self.d_decay is None else self.d_decay
        self.d_iclr = low_rank_width(C, 2.5) if self.d_iclr is None else self.d_iclr
        self.d_value = low_rank_width(C, 1.7) if self.d_value is None else self.d_value
        self.d_gate = low_rank_width(C, 5.0) if self.d_gate is None else self.d_gate

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size


def _plain_fp32(*ts: torch.Tensor | None) -> bool:
    """Whether every tensor is there, float32, on the CPU and contiguous: what the compiled one-token step reads."""
    return all(t is not None and t.dtype == torch.float32 and t.is_cpu and t.is_contiguous() for t in ts)


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 -> float32; float32 and float64 unchanged (the state is fp32; float64 in the tests' exact runs)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


class TimeMix(nn.Module):
    """The attention-like sub-block: token shift, r/k/v projections, decay, value residual, WKV-7, gated output."""

    def __init__(self, config: RWKV7Config, layer_id: int) -> None:
        super().__init__()
        C, H, N = config.n_embd, config.n_head, config.head_size
        Dw, Da, Dv, Dg = config.d_decay, config.d_iclr, config.d_value, config.d_gate
        self.layer_id = layer_id
        # a bool, not layer_id, is what the forward pass branches on: torch.compile specialises on the attribute it
        # reads, so all blocks after the first share one compiled graph
        self.makes_v_first = layer_id == 0
        self.n_head, self.head_size = H, N
        # registration order = BlinkDL's key order, so saved files list their keys as RWKV-LM's do
        self.x_r = nn.Parameter(torch.zeros(1, 1, C))
        self.x_w = nn.Parameter(torch.zeros(1, 1, C))
        self.x_k = nn.Parameter(torch.zeros(1, 1, C))
        self.x_v = nn.Parameter(torch.zeros(1, 1, C))
        self.x_a = nn.Parameter(torch.zeros(1, 1, C))
        self.x_g = nn.Parameter(torch.zeros(1, 1, C))
        self.w0 = nn.Parameter(torch.zeros(1, 1, C))
        self.w1 = nn.Parameter(torch.zeros(C, Dw))
        self.w2 = nn.Parameter(torch.zeros(Dw, C))
        self.a0 = nn.Parameter(torch.zeros(1, 1, C))
        self.a1 = nn.Parameter(torch.zeros(C, Da))
        self.a2 = nn.Parameter(torch.zeros(Da, C))
        if layer_id > 0 or config.layer0_value_mix:  # stored but unused in block 0, which makes v_first
            self.v0 = nn.Parameter(torch.zeros(1, 1, C))
            self.v1 = nn.Parameter(torch.zeros(C, Dv))
            self.v2 = nn.Parameter(torch.zeros(Dv, C))
        self.g1 = nn.Parameter(torch.zeros(C, Dg))
        self.g2 = nn.Parameter(torch.zeros(Dg, C))
        self.k_k = nn.Parameter(torch.zeros(1, 1, C))
        self.k_a = nn.Parameter(torch.zeros(1, 1, C))
        self.r_k = nn.Parameter(torch.zeros(H, N))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=64e-5)  # one group per head; BlinkDL's eps (head_size_divisor folded in)

    def forward(self, x: torch.Tensor, shift: torch.Tensor, wkv_state: torch.Tensor,
                v_first: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, C] (the ln1 output), shift [B, C] (the previous token's x), wkv_state [B, H, N, N] fp32,
        v_first [B * T, C] (layer 0's value; None in layer 0, which makes it).
        Returns (out [B, T, C], v_first, new wkv state)."""
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        heads = (B, T, H, N)  # how the WKV sees r, k, v, ...
        prev = as_dtype(shift, x.dtype).view(B, 1, C)
        if T > 1:
            prev = torch.cat([prev, x[:, :-1]], dim=1)  # (B, T, C): each position sees the token before it
        mixes = torch.stack([self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g])  # (6, 1, 1, C)
        # from here on rows of (B*T, C): every projection and low-rank product is a plain 2-D matmul (on 3-D inputs
        # each matmul adds three reshaping ops, a third of all ops of a one-token step)
        # x + xx * x_* for the six mixes at once, as one lerp (x + x_* * (prev - x): no separate subtraction)
        xr, xw, xk, xv, xa, xg = torch.lerp(x, prev, as_dtype(mixes, x.dtype)).view(6, B * T, C).unbind(0)

        r, k, v = self.receptance(xr), self.key(xk), self.value(xv)
        if k.dtype == torch.float16:  # fp16 cannot hold the L2 norm's eps (1e-12) nor the WKV's products
            r, k, v = r.float(), k.float(), v.float()
        # decay in fp32 (w0 is an fp32 parameter): the slow channels' decays sit within 1e-3 of 1
        log_decay = -LOG_DECAY_SCALE * torch.sigmoid(
            self.w0 + as_dtype(torch.tanh(xw @ self.w1) @ self.w2, self.w0.dtype))
        if self.makes_v_first:
            v_first = v
        else:  # value residual: move towards layer 0's value of the same token, per channel and token
            v = torch.lerp(v, v_first, as_dtype(torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2), v.dtype))
        # in-context learning rate, in (0, 1); in k's dtype (a float32 a0 trained next to a bf16 base would make it
        # float32, and the lerp below takes one dtype)
        a = as_dtype(torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2), k.dtype)
        g = torch.sigmoid(xg @ self.g1) @ self.g2

        kk = F.normalize((k * self.k_k).view(heads), dim=-1, p=2.0)  # unit key per head
        k = torch.lerp(k, k * a, as_dtype(self.k_a, k.dtype))  # k * (1 + (a - 1) * k_a): two operations, not four
        r, k, v, a = r.view(heads), k.view(heads), v.view(heads), a.view(heads)
        y, wkv_state = wkv7(r, log_decay.view(heads), k, v, -kk, kk * a, wkv_state)  # any T, one token included

        # GroupNorm over each head (in the model's dtype, as the `rwkv` package does), then the "bonus": the current
        # token's own value weighted by r.k per head (WKV-7 has no u term inside the recurrence)
        y = self.ln_x(as_dtype(y.reshape(B * T, C), x.dtype)).view(heads)
        y = torch.addcmul(y, (r * k * self.r_k).sum(dim=-1, keepdim=True), v)
        return self.output(as_dtype(y.view(B * T, C) * g, x.dtype)).view(B, T, C), v_first, wkv_state

    def one_token(self, step: ModuleType, x: torch.Tensor, v_first: torch.Tensor | None, state: RNNState,
                  new: RNNState, layer: int, ln1: nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` (with the block's ln1 before it) for one token per row through the compiled step (`step`,
        finetune.ops.rwkv7_step): x [B, C] fp32 (the block's input, before ln1) -> (input of the output projection
        [B, C], v_first [B, C]). Reads this layer's shift and WKV state from `state`, writes the new ones into `new`.
        Only when the block is `fusable()`, without autograd (RWKV7.forward decides)."""
        xr, xw, xk, xv, xa, xg = step.time_mix_in(x, state.att_shift, new.att_shift, layer, ln1.weight, ln1.bias,
                                                  ln1.eps, self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g)
        r, k, v = self.receptance(xr), self.key(xk), self.value(xv)
        v_mix = (self.v0, self.v1, self.v2) if self.layer_id > 0 else (None, None, None)  # block 0 makes v_first
        return step.time_mix_out(r, k, v, xw, xv, xa, xg, v_first, self.w0, self.w1, self.w2, self.a0, self.a1,
                                 self.a2, *v_mix, self.g1, self.g2, self.k_k, self.k_a, self.r_k, self.ln_x.weight,
                                 self.ln_x.bias, self.ln_x.eps, state.wkv, new.wkv, layer)


class ChannelMix(nn.Module):
    """The feed-forward sub-block: token shift and a squared-ReLU MLP (no receptance gate in RWKV-7)."""

    def __init__(self, config: RWKV7Config) -> None:
        super().__init__()
        C, F_ = config.n_embd, config.dim_ffn
        self.x_k = nn.Parameter(torch.zeros(1, 1, C))
        self.key = nn.Linear(C, F_, bias=False)
        self.value = nn.Linear(F_, C, bias=False)

    def forward(self, x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """x [B, T, C] (the ln2 output), shift [B, C] -> [B, T, C]."""
        B, T, C = x.shape
        prev = as_dtype(shift, x.dtype).view(B, 1, C)
        if T > 1:
            prev = torch.cat([prev, x[:, :-1]], dim=1)  # (B, T, C)
        # 2-D rows (see TimeMix), in one expression: no name keeps the mixed input alive beside the [B*T, F] hidden
        k = torch.relu(self.key(torch.lerp(x, prev, as_dtype(self.x_k, x.dtype)).view(B * T, C))) ** 2
        return self.value(k).view(B, T, C)

    def one_token(self, step: ModuleType, x: torch.Tensor, dx: torch.Tensor, state: RNNState, new: RNNState,
                  layer: int, ln2: nn.LayerNorm) -> torch.Tensor:
        """The residual add x + dx, ln2 and `forward` for one token per row through the compiled step: x, dx [B, C]
        fp32 -> the block's output [B, C]. Writes this layer's new shift into `new` (see TimeMix.one_token)."""
        x, xk = step.channel_mix_in(x, dx, state.ffn_shift, new.ffn_shift, layer, ln2.weight, ln2.bias, ln2.eps,
                                    self.x_k)
        return x + self.value(step.relu_square_(self.key(xk)))


class Block(nn.Module):
    def __init__(self, config: RWKV7Config, layer_id: int) -> None:
        super().__init__()
        C = config.n_embd
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(C)  # block 0 only: normalises the embedding (applied by RWKV7.forward)
        self.ln1 = nn.LayerNorm(C)
        self.ln2 = nn.LayerNorm(C)
        self.att = TimeMix(config, layer_id)
        self.ffn = ChannelMix(config)

    def forward(self, x: torch.Tensor, v_first: torch.Tensor | None, att_shift: torch.Tensor, wkv_state: torch.Tensor,
                ffn_shift: torch.Tensor):
        """x [B, T, C]; this layer's state pieces att_shift [B, C], wkv_state [B, H, N, N], ffn_shift [B, C].
        Returns (x, v_first, new att_shift, new wkv_state, new ffn_shift)."""
        xa = self.ln1(x)
        dx, v_first, wkv_state = self.att(xa, att_shift, wkv_state, v_first)
        x = x + dx
        xf = self.ln2(x)
        x = x + self.ffn(xf, ffn_shift)
        # the shifts are copies: a view would keep the whole [B, T, C] ln outputs alive as long as the state is (with
        # gradient checkpointing, two of them per block until the backward pass: 0.38 GB of a 1.5B model's peak)
        return x, v_first, xa[:, -1].clone(), wkv_state, xf[:, -1].clone()

    def fusable(self) -> bool:
        """Whether `one_token` computes what `forward` does for this block: plain LayerNorms and GroupNorm with
        weight and bias, and every small tensor (mixes, decay/rate/residual/gate factors, k_k, k_a, r_k, the norms'
        weights) float32 and contiguous. The projections are called as modules either way (LoRA-wrapped, quantized
        or plain), so they do not matter here. Runs on every one-token call: it reads the modules' parameter dicts
        directly (nn.Module attribute lookups would cost more than the check)."""
        att, ffn = self.att, self.ffn
        norms = (self.ln1, self.ln2, att.ln_x)
        return (tuple(map(type, norms)) == (nn.LayerNorm, nn.LayerNorm, nn.GroupNorm)
                and _plain_fp32(*att._parameters.values(), *ffn._parameters.values(),
                                *(p for norm in norms for p in (norm._parameters.get("weight"),
                                                                norm._parameters.get("bias")))))

    def one_token(self, step: ModuleType, x: torch.Tensor, v_first: torch.Tensor | None, state: RNNState,
                  new: RNNState, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` for one token per row through the compiled step: x [B, C] -> (x, v_first), this layer's
        state read from `state` and written into `new`."""
        y, v_first = self.att.one_token(step, x, v_first, state, new, layer, self.ln1)
        return self.ffn.one_token(step, x, self.att.output(y), state, new, layer, self.ln2), v_first


class RWKV7(RWKVModel):
    fp32_params = FP32_PARAMS

    def __init__(self, config: RWKV7Config) -> None:
        super().__init__(config, Block)

    def forward(self, idx: torch.Tensor, state: RNNState | None = None, return_state: bool = False,
                apply_head: bool = True, last_only: bool = False):
        """idx [B, T] token ids -> logits [B, T, V] (float32 when the weights are).

        With `state` (e.g. from a previous call) the sequence continues from it; gradients flow through it.
        `return_state=True` returns (logits, new RNNState). Without gradients (generation, prefill) the WKV runs
        the compiled kernel without an autograd node (`finetune.ops.wkv7`). `last_only` and `apply_head` as in
        RWKVModel.forward: the last position's logits only; the hidden states after ln_out instead of the logits.
        """
        B, T = idx.shape
        if state is None:
            state = self.empty_state(B, idx.device)
        ln0 = self.blocks[0].ln0
        x = ln0(as_dtype(self.emb(idx), ln0.weight.dtype))  # see as_dtype: a trained fp32 emb, bf16 ln0
        step = self._one_token_step(x, state)
        if step is not None:
            x, new_state = self._one_token(step, x, state)
            x = self.ln_out(x)
            logits = self.head(x) if apply_head else x
            return (logits, new_state) if return_state else logits
        v_first: torch.Tensor | None = None
        layers = []
        per_layer = zip(state.att_shift.unbind(1), state.wkv.unbind(1), state.ffn_shift.unbind(1))
        for block, (att_shift, wkv_state, ffn_shift) in zip(self.blocks, per_layer):
            x, v_first, *new = self.run_block(block, x, v_first, att_shift, wkv_state, ffn_shift)
            layers.append(tuple(new))
        x = self.ln_out(x[:, -1:] if last_only else x)
        logits = self.head(x) if apply_head else x
        if return_state:
            # float32 state whatever the weights' dtype (float64 stays float64: the tests' exact runs)
            return logits, RNNState(*(torch.stack([_at_least_fp32(t[j]) for t in layers], dim=1) for j in range(3)))
        return logits

    def _one_token_step(self, x: torch.Tensor, state: RNNState) -> ModuleType | None:
        """The compiled one-token step (finetune.ops.rwkv7_step) when it computes exactly what the PyTorch path
        would for this call: one token (x [B, 1, C]), float32 on the CPU, nothing recording gradients nor autocast
        changing dtypes, a float32 state, and blocks holding plain float32 small tensors (`Block.fusable`). Else
        None: float64 (the tests' exact runs), bf16/fp16 weights, training, any other device."""
        if (x.shape[1] != 1 or x.dtype != torch.float32 or not x.is_cpu or torch.is_grad_enabled()
                or torch.is_autocast_enabled("cpu")
                or any(t.dtype != torch.float32 for t in (state.att_shift, state.wkv, state.ffn_shift))
                or not all(block.fusable() for block in self.blocks)):
            return None
        return step_kernel()

    def _one_token(self, step: ModuleType, x: torch.Tensor, state: RNNState) -> tuple[torch.Tensor, RNNState]:
        """Every block on one token through the compiled step: x [B, 1, C] (after ln0) -> (x [B, 1, C] before
        ln_out, the new state). Each block writes its pieces of the new state in place (no stacking at the end)."""
        B, _, C = x.shape
        state = state.map(torch.Tensor.contiguous)  # e.g. an expanded learned start state
        new = RNNState(torch.empty_like(state.att_shift), torch.empty_like(state.wkv),
                       torch.empty_like(state.ffn_shift))
        x, v_first = x.reshape(B, C), None  # rows of (B, C): the projections are 2-D products
        for i, block in enumerate(self.blocks):
            x, v_first = block.one_token(step, x, v_first, state, new, i)
        return x.view(B, 1, C), new


# ----------------------------------------------------------------------------------------------------------------------
# Initialisation (RWKV-LM's scheme for RWKV-7: RWKV-v7/train_temp/src/model.py), used by `rwkv-lora init --arch 7`


def _orthogonal_(p: torch.Tensor, scale: float, gen: torch.Generator) -> None:
    """RWKV-LM's ortho_init for the low-rank second factors: orthogonal, gain scale (x sqrt(rows / cols) when tall)."""
    rows, cols = p.shape
    gain = math.sqrt(rows / cols) if rows > cols else 1.0
    nn.init.orthogonal_(p, gain=gain * scale, generator=gen)


@torch.no_grad()
def init_rwkv7_(model: RWKV7, seed: int = 0) -> RWKV7:
    """Initialise in place the way RWKV-LM does for a fresh RWKV-7.

    Token-shift mixes ramped over channels, mixing in more of the previous token in early layers; decay biases w0
    from -6 (fast) to 0 over channels, steeper with depth, plus a per-head zigzag; in-context rate a0 around
    sigmoid(-0.19); value-residual bias v0 around 0.73; first low-rank factors (w1, a1, v1, g1) zero and second ones
    orthogonal at gain 0.1, so every low-rank path starts silent; k_k 0.71, k_a 1.02, r_k -0.04; ln_x weight
    ((layer + 1) / L) ** 0.7; projections orthogonal (att.key at gain 0.1) with att.output and ffn.value zero so
    every block starts as the identity; embedding uniform +-1e-4; head orthogonal at gain 0.5 * sqrt(V / C).
    """
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    C, L, N, V = cfg.n_embd, cfg.n_layer, cfg.head_size, cfg.vocab_size
    n = torch.arange(C, dtype=torch.float64)
    ddd = n / C  # 0 .. (C-1)/C
    linear = n / max(C - 1, 1) - 0.5  # -0.5 .. 0.5
    half = (N - 1) / 2
    zigzag = ((n % N) - half) / half if N > 1 else torch.zeros(C, dtype=torch.float64)  # -1 .. 1 within each head
    zigzag = zigzag * zigzag.abs()

    def row(t: torch.Tensor) -> torch.Tensor:
        return t.view(1, 1, C)

    for i, block in enumerate(model.blocks):
        ratio_0_to_1 = i / max(L - 1, 1)
        ratio_1_to_almost0 = 1.0 - i / L
        att, ffn = block.att, block.ffn
        att.x_r.copy_(row(1 - ddd ** (0.2 * ratio_1_to_almost0)))
        att.x_w.copy_(row(1 - ddd ** (0.9 * ratio_1_to_almost0)))
        att.x_k.copy_(row(1 - ddd ** (0.7 * ratio_1_to_almost0)))
        att.x_v.copy_(row(1 - ddd ** (0.7 * ratio_1_to_almost0)))
        att.x_a.copy_(row(1 - ddd ** (0.9 * ratio_1_to_almost0)))
        att.x_g.copy_(row(1 - ddd ** (0.2 * ratio_1_to_almost0)))
        decay = -6 + 6 * (n / max(C - 1, 1)) ** (1 + ratio_0_to_1 ** 0.3)
        att.w0.copy_(row(decay + 0.5 + zigzag * 2.5))
        att.a0.copy_(row(-0.19 + zigzag * 0.3 + linear * 0.4))
        low_rank = [(att.w1, att.w2), (att.a1, att.a2), (att.g1, att.g2)]
        if hasattr(att, "v0"):
            att.v0.copy_(row(0.73 - linear * 0.4))
            low_rank.append((att.v1, att.v2))
        for first, second in low_rank:
            first.zero_()
            _orthogonal_(second, 0.1, gen)
        att.k_k.copy_(row(0.71 - linear * 0.1))
        att.k_a.fill_(1.02)
        att.r_k.fill_(-0.04)
        att.ln_x.weight.fill_(((i + 1) / L) ** 0.7)
        att.ln_x.bias.zero_()
        nn.init.orthogonal_(att.receptance.weight, gain=1.0, generator=gen)
        nn.init.orthogonal_(att.key.weight, gain=0.1, generator=gen)
        nn.init.orthogonal_(att.value.weight, gain=1.0, generator=gen)
        att.output.weight.zero_()
        ffn.x_k.copy_(row(1 - ddd ** (ratio_1_to_almost0 ** 4)))
        nn.init.orthogonal_(ffn.key.weight, gain=1.0, generator=gen)
        ffn.value.weight.zero_()
        for ln in (block.ln1, block.ln2, getattr(block, "ln0", None)):
            if ln is not None:
                ln.weight.fill_(1.0)
                ln.bias.zero_()
    model.ln_out.weight.fill_(1.0)
    model.ln_out.bias.zero_()
    model.emb.weight.uniform_(-1e-4, 1e-4, generator=gen)
    nn.init.orthogonal_(model.head.weight, gain=0.5 * math.sqrt(V / C) if V > C else 0.5, generator=gen)
    return model


# ----------------------------------------------------------------------------------------------------------------------
# The checkpoint layout


def config_from_state_dict(sd: dict[str, torch.Tensor], path: str | Path = "<memory>") -> RWKV7Config:
    """Every dimension read off the tensors (never typed by hand): L, C, V, H and N from att.r_k [H, N], the ffn
    width and each low-rank width, and whether block 0 stores v0/v1/v2. One-line FinetuneError if malformed."""
    V, C = dims(sd, "emb.weight", 2, path, "RWKV-7")
    n_layer = block_count(sd, path, "RWKV-7")
    H, N = dims(sd, "blocks.0.att.r_k", 2, path, "RWKV-7")
    if H * N != C:
        raise FinetuneError(f"{path}: blocks.0.att.r_k has shape {(H, N)} (heads x head size) but emb.weight has "
                            f"width {C} != {H * N}")
    layer0_value_mix = any(f"blocks.0.att.{p}" in sd for p in ("v0", "v1", "v2"))
    if n_layer > 1:
        d_value = dims(sd, "blocks.1.att.v1", 2, path, "RWKV-7")[1]
    elif layer0_value_mix:
        d_value = dims(sd, "blocks.0.att.v1", 2, path, "RWKV-7")[1]
    else:
        d_value = None  # a one-block model without v1 anywhere: no layer uses the value residual
    return RWKV7Config(n_layer=n_layer, n_embd=C, vocab_size=V, head_size=N,
                       dim_ffn=dims(sd, "blocks.0.ffn.key.weight", 2, path, "RWKV-7")[0],
                       d_decay=dims(sd, "blocks.0.att.w1", 2, path, "RWKV-7")[1],
                       d_iclr=dims(sd, "blocks.0.att.a1", 2, path, "RWKV-7")[1],
                       d_value=d_value,
                       d_gate=dims(sd, "blocks.0.att.g1", 2, path, "RWKV-7")[1],
                       layer0_value_mix=layer0_value_mix)


def expected_shapes(config: RWKV7Config) -> dict[str, tuple[int, ...]]:
    """Every key of an RWKV-7 checkpoint with its shape."""
    C, V, F_, H, N = config.n_embd, config.vocab_size, config.dim_ffn, config.n_head, config.head_size
    widths = {"w": config.d_decay, "a": config.d_iclr, "v": config.d_value, "g": config.d_gate}
    shapes: dict[str, tuple[int, ...]] = {"emb.weight": (V, C), "blocks.0.ln0.weight": (C,),
                                          "blocks.0.ln0.bias": (C,)}
    for i in range(config.n_layer):
        b = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            shapes[f"{b}{ln}.weight"] = (C,)
            shapes[f"{b}{ln}.bias"] = (C,)
        for m in ("r", "w", "k", "v", "a", "g"):
            shapes[f"{b}att.x_{m}"] = (1, 1, C)
        for p, D in widths.items():
            if p == "v" and i == 0 and not config.layer0_value_mix:
                continue
            if p != "g":  # the gate has no bias
                shapes[f"{b}att.{p}0"] = (1, 1, C)
            shapes[f"{b}att.{p}1"] = (C, D)
            shapes[f"{b}att.{p}2"] = (D, C)
        shapes[f"{b}att.k_k"] = (1, 1, C)
        shapes[f"{b}att.k_a"] = (1, 1, C)
        shapes[f"{b}att.r_k"] = (H, N)
        for m in ("receptance", "key", "value", "output"):
            shapes[f"{b}att.{m}.weight"] = (C, C)
        shapes[f"{b}att.ln_x.weight"] = (C,)
        shapes[f"{b}att.ln_x.bias"] = (C,)
        shapes[f"{b}ffn.x_k"] = (1, 1, C)
        shapes[f"{b}ffn.key.weight"] = (F_, C)
        shapes[f"{b}ffn.value.weight"] = (C, F_)
    shapes["ln_out.weight"] = (C,)
    shapes["ln_out.bias"] = (C,)
    shapes["head.weight"] = (V, C)
    return shapes


# the small tensors users train in full next to LoRA ("time"): mixes, decay/rate/residual biases and low-rank factors
TIME_PARAMS = tuple(f".att.{p}" for p in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "w1", "w2", "a0", "a1",
                                          "a2", "v0", "v1", "v2", "g1", "g2", "k_k", "k_a", "r_k")) + (".ffn.x_k",)
LN_PARAMS = (".ln0.", ".ln1.", ".ln2.", ".att.ln_x.")


UNUSED_PARAMS = ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")
"""Stored by RWKV-LM but never used (block 0 makes v_first): in no trainable group, since a tensor without a
gradient would make DDP fail and waste AdamW state."""


def _is_time(name: str) -> bool:
    return name.endswith(TIME_PARAMS) and not name.endswith(UNUSED_PARAMS)


def _is_ln(name: str) -> bool:
    return any(p in name for p in LN_PARAMS) or name.startswith("ln_out.")


def describe(config: RWKV7Config) -> list[str]:
    """Extra `rwkv-lora info` lines."""
    layer0 = "" if config.layer0_value_mix else " (block 0 without v0/v1/v2)"
    return [f"width:       {config.n_embd} ({config.n_head} heads x {config.head_size}, ffn {config.dim_ffn})",
            f"low-rank:    decay {config.d_decay}, in-context rate {config.d_iclr}, value residual {config.d_value}, "
            f"gate {config.d_gate}{layer0}"]


FAMILY = Family(
    name="rwkv7",
    title="RWKV-7 (Goose)",
    model_class=RWKV7,
    config_class=RWKV7Config,
    config_from_state_dict=config_from_state_dict,
    expected_shapes=expected_shapes,
    init=init_rwkv7_,
    lora_parts={"att": ("receptance", "key", "value", "output"), "ffn": ("key", "value")},
    full_groups={"time": _is_time, "ln": _is_ln, "emb": lambda n: n == "emb.weight",
                 "head": lambda n: n == "head.weight"},
    fp32_params=FP32_PARAMS,
    describe=describe,
    time_state_transposed=False,  # the files hold the package's v7 state as it is (RWKV-Runner: no transpose for v7)
)
