"""What the layers above ask of an RWKV generation: the `Family` record each model module exports.

A family is one RWKV generation (RWKV-4, 5.2, 6, 7). Its module (`finetune/models/rwkvN.py`) holds a plain
`nn.Module` whose module tree is the checkpoint's key layout, and exports one `FAMILY = Family(...)` describing it.
The trainer, adapters, merge, generation, infctx and state tuning use only this record and the model's methods
(`forward(idx, state, return_state)`, `empty_state(batch)`, `cast(dtype)`), never a tensor name of their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from finetune.errors import FinetuneError


def dims(sd: dict[str, Any], key: str, ndim: int, path: Any, title: str) -> tuple[int, ...]:
    """The shape of `sd[key]`, which must have `ndim` non-zero dimensions; a one-line FinetuneError naming the file
    otherwise (for `config_from_state_dict`: every dimension is read off a tensor's shape)."""
    if key not in sd:
        raise FinetuneError(f"{path}: incomplete {title} checkpoint (no {key})")
    shape = tuple(sd[key].shape)
    if len(shape) != ndim or 0 in shape:
        raise FinetuneError(f"{path}: {key} has shape {shape}, expected {ndim} non-zero dimensions")
    return shape


def block_count(sd: dict[str, Any], path: Any, title: str) -> int:
    """The number of layers: the N of the `blocks.N.*` keys, which must be exactly 0 .. n-1. Checked here, before
    anything is built per layer: one stray `blocks.1000000.*` key must not make `expected_shapes` list a million
    layers' keys before the file is refused."""
    found = set()
    for k in sd:
        if k.startswith("blocks."):
            index = k.split(".")[1]
            if not (index.isascii() and index.isdigit()):
                raise FinetuneError(f"{path}: malformed {title} checkpoint ({k} is not blocks.<number>.*)")
            found.add(int(index))
    if not found:
        raise FinetuneError(f"{path}: incomplete {title} checkpoint (no blocks.N.* keys)")
    n = max(found) + 1
    if len(found) != n:
        gap = min(set(range(n)) - found)
        raise FinetuneError(f"{path}: incomplete {title} checkpoint (no blocks.{gap}.* keys, yet blocks.{n - 1} "
                            f"exists)")
    return n


@dataclass
class RNNState:
    """The recurrent state of an RWKV model, batch first, float32: the same three pieces in every generation.

    att_shift [B, L, C]   the last ln1 output each layer's time-mix saw (token shift)
    wkv       [B, L, ...] the WKV state: RWKV-4 [B, L, 3, C] (numerator a, denominator b, running max p);
                          RWKV-5/6/7 [B, L, H, N, N] (one N x N matrix per head, in the `rwkv` package's layout)
    ffn_shift [B, L, C]   the last ln2 output each layer's channel-mix saw

    Layer i of the `rwkv` package's state list is (att_shift[:, i], wkv[:, i], ffn_shift[:, i]) (RWKV-4's five rows
    are att_shift, a, b, p, ffn_shift). Gradients flow through it (infctx, state tuning).
    """

    att_shift: torch.Tensor
    wkv: torch.Tensor
    ffn_shift: torch.Tensor

    FIELDS = ("att_shift", "wkv", "ffn_shift")

    @property
    def batch_size(self) -> int:
        return self.att_shift.shape[0]

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer i's (att_shift [B, C], wkv [B, ...], ffn_shift [B, C])."""
        return self.att_shift[:, i], self.wkv[:, i], self.ffn_shift[:, i]

    @classmethod
    def stack(cls, layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> "RNNState":
        """The inverse of `layer`: per-layer (att_shift, wkv, ffn_shift) triples -> one state (float32)."""
        return cls(*(torch.stack([t[j].float() for t in layers], dim=1) for j in range(3)))

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "RNNState":
        return RNNState(fn(self.att_shift), fn(self.wkv), fn(self.ffn_shift))

    def clone(self) -> "RNNState":
        return self.map(torch.clone)

    def detach(self) -> "RNNState":
        return self.map(torch.Tensor.detach)

    def to(self, *args, **kwargs) -> "RNNState":
        return self.map(lambda t: t.to(*args, **kwargs))

    def rows(self, index: torch.Tensor | list[int] | slice) -> "RNNState":
        """A sub-batch (e.g. the streams of a server batch)."""
        return self.map(lambda t: t[index])

    @classmethod
    def cat(cls, states: list["RNNState"]) -> "RNNState":
        """Several states as one batch (rows in order)."""
        return cls(*(torch.cat([getattr(s, f) for s in states], dim=0) for f in cls.FIELDS))

    def expand(self, batch: int) -> "RNNState":
        """An unbatched state ([L, ...] per field, e.g. a learned start state) repeated as `batch` rows (a view)."""
        return self.map(lambda t: t.unsqueeze(0).expand(batch, *t.shape))

    def tensors(self) -> dict[str, torch.Tensor]:
        """{field: tensor}, e.g. for a safetensors file."""
        return {f: getattr(self, f) for f in self.FIELDS}


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype, without a dispatch when it already is (the one-token paths count their operations).

    Also where a trained tensor meets an activation in an operation that takes one dtype only (lerp; layer_norm on
    the CPU with float32 input and bf16 weights): bf16-mixed training keeps the trained tensors (a `time` mix, the
    embedding) float32 next to a bf16 base whose activations are bf16, and the tensor takes the activation's dtype."""
    return t if t.dtype == dtype else t.to(dtype)


def tall_weights_column_major_(model: nn.Module, *args: object) -> None:
    """Store every tall Linear weight [out, in] (out > in: the head and ffn.key) column-major, strides (1, out): the
    same tensor to every reader, but x @ weight.T then reads
    a contiguous [in, out] matrix, which one row of x multiplies ~35-45% faster (one thread: head 65536 x 768 ~9 ms
    instead of ~14, ffn.key 3072 x 768 0.57 ms instead of 0.74 when streamed from memory; square and wide matrices
    are as fast or faster row-major, so they stay). The `rwkv` package stores every matrix transposed for this
    reason. Saved files are row-major (`model_state_dict` makes tensors contiguous). Also the load_state_dict
    post-hook (*args: module, incompatible keys), since loading assigns the file's row-major tensors, and called by
    `checkpoint.build_from_state_dict` after its tensor-by-tensor assignment. Plain floating-point weights of the
    model's own layers only (a quantized weight keeps the layout its kernels expect; LoRA factors are left alone)."""
    for name, m in model.named_modules():
        if "lora_" in name:  # peft's trainable factors keep the layout they were made with (resume is bit-exact)
            continue
        w = getattr(m, "weight", None) if isinstance(m, nn.Linear) else None
        if (w is not None and type(w.data) is torch.Tensor and w.is_floating_point() and m.out_features > m.in_features
                and w.is_contiguous()):
            w.data = w.data.t().contiguous().t()


class RWKVModel(nn.Module):
    """What every family's model shares around its own `forward`: RNN steps, chunked prefill, dtype casting.

    Every generation has the same outer layout, built here: `emb`, `blocks` (the family's `Block(config, i)`, each
    `block(x, att_shift, wkv, ffn_shift)` -> the same four after the window), `ln_out` and `head`. `zero_state`
    below is the matrix state of RWKV-5/6/7 (RWKV-4 defines its own). `forward` below is the forward of a family
    whose blocks take and return just that; one whose blocks pass more along (RWKV-7's v_first) defines its own. Training, prefill
    and single-token generation all call that one forward (a block may take a fast path when T == 1).
    """

    fp32_params: tuple[str, ...] = ()
    """Name suffixes of parameters kept float32 by `cast` (decays and the like)."""

    def __init__(self, config: Any, block: Callable[[Any, int], nn.Module]) -> None:
        super().__init__()
        self.config = config
        self.emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(block(config, i) for i in range(config.n_layer))
        self.ln_out = nn.LayerNorm(config.n_embd)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        tall_weights_column_major_(self)  # head and ffn.key: faster one-token products
        self.gradient_checkpointing = False
        """Recompute each block in the backward pass instead of keeping its activations (training only)."""
        self.checkpoint_dtypes: dict[str, torch.dtype] = {}
        """The dtype each tensor had in the file it was loaded from; `save_checkpoint` writes them back so."""
        self.initial_state: RNNState | None = None
        """A learned start state (a state adapter; unbatched, [L, ...] per field) used instead of `zero_state`; a
        plain attribute, not a parameter, so checkpoints keep exactly BlinkDL's keys."""
        self.register_load_state_dict_post_hook(tall_weights_column_major_)

    def zero_state(self, batch: int, device: torch.device | str) -> RNNState:
        """All zeros (no token seen): att_shift [B, L, C], wkv [B, L, H, N, N] (rows = key index), ffn_shift
        [B, L, C], float32."""
        cfg = self.config
        L, C, H, N = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size
        return RNNState(torch.zeros(batch, L, C, device=device), torch.zeros(batch, L, H, N, N, device=device),
                        torch.zeros(batch, L, C, device=device))

    def forward(self, idx: torch.Tensor, state: RNNState | None = None, return_state: bool = False,
                apply_head: bool = True, last_only: bool = False) -> torch.Tensor | tuple[torch.Tensor, RNNState]:
        """idx [B, T] token ids -> logits [B, T, V] (and the state after the last token when `return_state`).

        With `state` (e.g. from a previous call) the sequence continues from it; gradients flow through it.
        `last_only`: the logits of the last position only, [B, 1, V] (a prompt's prefill: the head is the largest
        matrix, and T - 1 rows of its product would be thrown away). `apply_head=False` returns the final hidden
        states [B, T, C] (after ln_out) instead of the logits: the training loss applies the head a few rows at a
        time (`finetune.ops.head_ce`).
        """
        if state is None:
            state = self.empty_state(idx.shape[0], idx.device)
        x = self.emb(idx)
        layers = []
        for i, block in enumerate(self.blocks):
            x, *layer = self.run_block(block, x, *state.layer(i))
            layers.append(layer)
        x = self.ln_out(x[:, -1:] if last_only else x)
        out = self.head(x) if apply_head else x
        if return_state:
            return out, RNNState.stack(layers)
        return out

    def run_block(self, block: nn.Module, *args: Any) -> Any:
        """block(*args), recomputed in the backward pass instead of keeping its activations when gradient
        checkpointing is on (training only)."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def empty_state(self, batch: int = 1, device: torch.device | str | None = None) -> RNNState:
        """The state before any token (the learned `initial_state` when a state adapter is plugged in)."""
        device = self.emb.weight.device if device is None else device
        if self.initial_state is not None:
            return self.initial_state.to(device=device, dtype=torch.float32).expand(batch)
        return self.zero_state(batch, device)

    @torch.inference_mode()  # generation only: cheaper than no_grad (no version counters)
    def step(self, tokens: torch.Tensor | Sequence[int], state: RNNState | None = None):
        """One token per sequence: tokens [B] -> (logits [B, V], new state). The forward on a length-1 window."""
        tokens = torch.as_tensor(tokens, device=self.emb.weight.device).reshape(-1, 1)
        logits, state = self.forward(tokens, state, return_state=True)
        return logits[:, -1], state

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor | Sequence[int], state: RNNState | None = None, chunk_len: int = 1024):
        """Feed a prompt of any length chunk by chunk (memory stays flat): tokens [T] or [B, T] -> (logits of the
        last position [B, V], state)."""
        tokens = torch.as_tensor(tokens, device=self.emb.weight.device)
        if tokens.dim() == 1:
            tokens = tokens.unsqueeze(0)
        if tokens.shape[1] == 0:
            raise ValueError("prefill needs at least one token")
        logits = None
        for start in range(0, tokens.shape[1], chunk_len):
            logits, state = self.forward(tokens[:, start:start + chunk_len], state, return_state=True, last_only=True)
        return logits[:, -1], state

    def cast(self, dtype: torch.dtype) -> "RWKVModel":
        """Cast every weight to `dtype` except the `fp32_params`, which stay float32."""
        for name, p in self.named_parameters():
            p.data = p.data.float() if name.endswith(self.fp32_params) else p.data.to(dtype)
        return self

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


@dataclass(frozen=True)
class Family:
    """One RWKV generation, as the rest of the toolkit sees it."""

    name: str
    """Short id recorded in adapters and state files: "rwkv4", "rwkv5", "rwkv6", "rwkv7"."""
    title: str
    """What `info` prints: "RWKV-4", "RWKV-5.2 (Eagle)", ..."""
    model_class: type[nn.Module]
    """The nn.Module, built as `model_class(config)`; its state_dict keys are the checkpoint's keys."""
    config_class: type
    """The config dataclass: built as config_class(n_layer=, n_embd=, vocab_size=[, head_size=]) by `init`."""
    config_from_state_dict: Callable[[dict[str, torch.Tensor], Any], Any]
    """(state_dict, path) -> config: every dimension read off the tensors; one-line FinetuneError if malformed."""
    expected_shapes: Callable[[Any], dict[str, tuple[int, ...]]]
    """config -> every checkpoint key with its shape."""
    init: Callable[..., nn.Module]
    """(model, seed=0) -> the model initialised in place the way RWKV-LM does for this generation."""
    lora_parts: dict[str, tuple[str, ...]]
    """LoRA targets by part: {"att": ("receptance", "key", ...), "ffn": (...)}; names are submodules of
    blocks.N.<part>."""
    full_groups: dict[str, Callable[[str], bool]]
    """Tensors trainable in full next to LoRA, by group ("time", "ln", "emb", "head"): a predicate on checkpoint
    names."""
    fp32_params: tuple[str, ...] = ()
    """Name suffixes of parameters kept float32 whatever the model's dtype (decays and the like)."""
    describe: Callable[[Any], list[str]] = field(default=lambda config: [])
    """config -> extra `info` lines (heads, low-rank widths, ...)."""
    state_tune: Callable[[Any], nn.Module] | None = None
    """config -> a module whose forward() gives the trainable unbatched WKV start state [L, ...] for state tuning;
    None: the WKV state itself is the parameter (starting from the empty state)."""
    time_state_transposed: bool | None = None
    """How this family's WKV state travels in the state files RWKV-Runner and RWKV-PEFT share (one
    `blocks.i.att.time_state` [H, N, N] per layer; see `finetune.state_files`): False = the file holds layer i's
    `RNNState.wkv[0, i]` as it is (RWKV-7); True = with its last two axes swapped (RWKV-5/6, whose `rwkv` package
    state is the transpose of the files'); None = the family has no such files (RWKV-4: no matrix per head)."""
