"""The serving engine: one base model, many adapters plugged in unmerged, every active stream decoded in one batch.

- `MultiLoRALinear` replaces each adapted nn.Linear. It holds every served adapter's (A, B) for that layer and, for
  a batch whose row i uses adapter slot s_i, computes y = x W^T + s_a (x A_{s_i}^T) B_{s_i}^T per row: the base
  matmul is shared by the whole batch, the low-rank deltas of the adapters present are two more matmuls with a
  per-row mask. Nothing is merged and the base exists once in memory (plus, on CPUs, the packed copy below).
- `PackedLinear`: an fp32 base on a CPU multiplies the few rows of a decode step with panel-packed copies of its
  linear weights (`finetune.ops.rows_matmul`: ~1.8x faster products at 8 rows than oneDNN's and ~3x MKL's on the
  AVX2 machine measured; a batch's LoRA deltas in the same kernel); one row and a prefill's many rows use the plain
  weight.
- A single worker thread owns the model. Each loop it admits waiting requests (their prompts are prefilled from the
  longest cached prefix, each row with its adapter active; prompts admitted together with as many tokens left go
  through one forward), samples one token per active row (ChatRWKV's sampling and penalties from
  `finetune.generate`, a torch.Generator per request), turns tokens into text with `generate.TextStream` (stop
  strings, UTF-8), drops finished or cancelled rows, and runs ONE `model.step` for all the rows left.
- `StateCache` keeps the RNN state (and last logits) after each prompt and after each chat reply, keyed by (adapter,
  token ids), bounded in bytes, least recently used first out; a request prefills only what follows its longest
  cached prefix.

Adapters served: LoRA adapters and state adapters (the row starts from the adapter's learned state). Adapters that
train tensors in full (ln, time, emb, head) change the base for every row and cannot be applied per row: they are
refused at load with one line (merge them into a base with `rwkv-lora merge` and serve that).
"""

from __future__ import annotations

import itertools
import queue
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from finetune.adapter_format import Adapter, adapter_tokenizer, check_adapter, is_adapter, read_adapter
from finetune.plugin import load_model
from finetune.errors import FinetuneError, first_line
from finetune.generate import Penalties, TextStream, check_sampling, resolve_tokenizer, sample_logits
from finetune.models import RNNState, family_for
from finetune.ops import rows_matmul
from finetune.templates import ChatTemplate, resolve_template
from finetune.quant import default_dtype, linear as quant_linear
from finetune.serve.config import ServeConfig
from finetune.tokenizer import Tokenizer

BASE_SLOT = 0  # the slot of "no adapter": its deltas are zero
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
"""A servable adapter name: also a safe file name (no separators, no leading dot, no '..' possible as a whole)."""


# ----------------------------------------------------------------------------------------------------------------------
# Per-row LoRA


class LoRARouting:
    """Which adapter slot each row of the current forward uses; shared by every `MultiLoRALinear` of a model."""

    def __init__(self) -> None:
        self.slots: list[int] | None = None
        """Slot per row; None: no adapter anywhere."""
        self.uniform: int | None = None
        """The slot when every row uses the same one (two thin matmuls, as `LoRALinear`)."""
        self.version = 0
        """Bumped when the rows' slots change: layers rebuild their per-batch factors only then."""
        self._last: list[int] | None = None
        """The slots `version` stands for (kept across `clear`: the next decode step usually has the same rows)."""

    def set(self, slots: Sequence[int]) -> None:
        slots = list(slots)
        if slots != self._last:
            self.version += 1
            self._last = slots
        self.slots = slots
        self.uniform = slots[0] if all(s == slots[0] for s in slots) else None

    def clear(self) -> None:
        self.slots, self.uniform = None, None


PREFILL_ROWS = 1024
"""Prompt tokens (rows x tokens) per forward when prompts are prefilled together: `model.prefill`'s chunk for one."""


def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """The panel-packed copy of a frozen fp32 CPU weight [out, in] that `rows_matmul` multiplies a few rows with
    (as many bytes as the weight, plus the padding of out to a multiple of 24), or None where that path does not
    apply (another device or dtype, a quantized weight, which keeps its own kernels: `finetune.quant.linear`).

    Why: an 8-row decode step of the 12 x 768 RWKV-4 with vocab 65536 spends most of its time in these products;
    on the AVX2 CPU measured (one thread) the whole 8-row step takes ~50-55 ms with them against ~125-135 ms with
    MKL on the plain weights (and ~80 with oneDNN's prepacked ones before; `bench/gemm_floor.py` has every matrix)."""
    return rows_matmul.pack(weight)


class PackedLinear(nn.Linear):
    """A frozen nn.Linear of the served base that multiplies 2 to `rows_matmul.MAX_ROWS` rows (a decode step of
    several streams) with its panel-packed weight (`pack_weight`); one row (memory-bound: torch's matrix-vector
    product on the model's own layout is faster, the tall head's column-major one most) and more rows (a prefill,
    where torch's GEMM is at its best) use the plain weight.

    Memory: the packed copy is held next to the plain weight (the state dict, adapters' shape checks, one-row
    products and prefills use it), so every packed matrix is in memory twice: for the 12 x 768 RWKV-4 with vocab
    65536, +569 MB on 771 MB of parameters (`Engine.packed_bytes`)."""

    def __init__(self, base: nn.Linear, packed: torch.Tensor | None) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.compute_dtype = getattr(base, "compute_dtype", base.weight.dtype)  # a narrow-held weight's model dtype
        self.packed = packed
        """The panel-packed weight (`pack_weight`), or None (then every product is `quant_linear`'s)."""

    def uses_panels(self, x: torch.Tensor) -> bool:
        """Whether x's rows are multiplied with the packed panels (2 to MAX_ROWS rows of a packed weight)."""
        return self.packed is not None and 1 < x.numel() // x.shape[-1] <= rows_matmul.MAX_ROWS

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T + bias."""
        if not self.uses_panels(x):
            return quant_linear(x, self.weight, self.bias)
        y = rows_matmul.matmul(x, self.packed, self.out_features)
        return y if self.bias is None else y.add_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_forward(x)


def pack_linears(model: nn.Module) -> int:
    """Every nn.Linear of the model whose weight `pack_weight` packs becomes a PackedLinear (same Parameters);
    returns the bytes of the packed copies."""
    total = 0
    for name, m in list(model.named_modules()):
        if type(m) is not nn.Linear:
            continue
        packed = pack_weight(m.weight)
        if packed is None:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, PackedLinear(m, packed))
        total += packed.numel() * packed.element_size()
    return total


@dataclass
class _MixedFactors:
    """A mixed batch's LoRA factors in one `MultiLoRALinear` (see there), built when the batch's rows change."""

    version: int
    """The routing version they were built for."""
    At: torch.Tensor | None = None
    """A_cat^T [in, sum r], or None when no row of the batch has an adapter in this layer."""
    Bt: torch.Tensor | None = None
    """B_cat^T [sum r, out] (scaling included)."""
    mask: torch.Tensor | None = None
    """[B, 1, sum r]: 1 where the row's own adapter's block is."""
    panels: tuple[torch.Tensor, torch.Tensor] | None = None
    """A_cat and B_cat packed for `rows_matmul.lora_add_` (a packed base), else None."""


class MultiLoRALinear(PackedLinear):
    """An nn.Linear with every served adapter's LoRA factors, applied per batch row (see the module docstring).

    The weight is the original Parameter (state dict unchanged). For a mixed batch the factors of the adapters
    present are concatenated, A_cat [sum r, in] and B_cat [out, sum r], and a 0/1 mask [B, sum r] keeps each row's
    own block: y = x W^T + ((x A_cat^T) * mask) B_cat^T. Two dense matmuls and no per-row gather; the blocks of
    other adapters contribute exact zeros, so each row equals its adapter alone. The concatenation is rebuilt only
    when the batch's rows change, and kept transposed (A_cat^T, B_cat^T, contiguous): the products are then plain
    `mm`/`addmm` calls, the mask multiplies in place and the add is the `addmm`'s, one op and one [B, out] tensor
    fewer per layer than `F.linear` twice, a multiply and an add (the same bits; 1-3 of the ~80 CPU-ms of an 8-row
    step of the 12 x 768 RWKV-4 with three adapters). On a packed base the 2 to 32 rows of a decode step take the
    products, the mask and the add in one call, `rows_matmul.lora_add_`, on the factors packed as panels (also when
    every row uses one adapter)."""

    def __init__(self, base: nn.Linear, routing: LoRARouting) -> None:
        super().__init__(base, base.packed if isinstance(base, PackedLinear) else None)
        self.routing = routing
        self.pairs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        """slot -> (A [r, in], scaling * B [out, r]) in the model's dtype."""
        self.panel_pairs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        """slot -> (A, scaling * B) packed for `rows_matmul.lora_add_`, when the base weight is packed."""
        self._batch: _MixedFactors | None = None
        """The current rows' concatenated factors, for the routing version they were built for."""

    def set_slot(self, slot: int, A: torch.Tensor, B: torch.Tensor, scaling: float) -> None:
        dtype, device = self.compute_dtype, self.weight.device
        a, b = A.to(device=device, dtype=dtype), (B.float() * scaling).to(device=device, dtype=dtype)
        self.pairs[slot] = (a, b)
        if self.packed is not None:
            self.panel_pairs[slot] = (rows_matmul.pack(a), rows_matmul.pack(b))
        self._batch = None

    def _factors(self) -> _MixedFactors | None:
        version = self.routing.version
        if self._batch is None or self._batch.version != version:
            slots = self.routing.slots
            present = sorted({s for s in slots if s in self.pairs})
            if not present:
                self._batch = _MixedFactors(version)
            else:
                A = torch.cat([self.pairs[s][0] for s in present], 0)  # [sum r, in]
                B = torch.cat([self.pairs[s][1] for s in present], 1)  # [out, sum r]
                mask = torch.zeros(len(slots), 1, A.shape[0], dtype=A.dtype, device=A.device)
                start = 0
                for s in present:
                    r = self.pairs[s][0].shape[0]
                    mask[[i for i, row_slot in enumerate(slots) if row_slot == s], :, start:start + r] = 1
                    start += r
                panels = (rows_matmul.pack(A), rows_matmul.pack(B)) if self.packed is not None else None
                self._batch = _MixedFactors(version, A.t().contiguous(), B.t().contiguous(), mask, panels)
        return self._batch if self._batch.At is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_forward(x)
        if self.routing.slots is None:
            return y
        s = self.routing.uniform
        if s is not None:  # one adapter for the whole batch: as `LoRALinear` does
            if s in self.pairs:
                if self.uses_panels(x):
                    a, b = self.panel_pairs[s]
                    return rows_matmul.lora_add_(y, x, a, self.pairs[s][0].shape[0], b)
                a, b = self.pairs[s]
                y = y + F.linear(F.linear(x, a), b)
            return y
        f = self._factors()
        if f is None:
            return y
        if self.uses_panels(x):
            a, b = f.panels
            return rows_matmul.lora_add_(y, x, a, f.At.shape[1], b, f.mask.view(f.mask.shape[0], -1))
        h = torch.mm(x.reshape(-1, x.shape[-1]), f.At)  # [B * T, sum r]
        h.view(f.mask.shape[0], -1, h.shape[-1]).mul_(f.mask)  # each row (all its T positions) keeps its own block
        return torch.addmm(y.reshape(-1, y.shape[-1]), h, f.Bt).view(y.shape)


# ----------------------------------------------------------------------------------------------------------------------
# Adapters as served


@dataclass
class ServedAdapter:
    """One selectable model name: the base (slot 0) or an adapter plugged into its slot."""

    name: str
    slot: int
    tokenizer: Tokenizer
    template: ChatTemplate
    path: str | None = None
    adapter: Adapter | None = None
    start_state: RNNState | None = None
    """A state adapter's learned start state (unbatched), else None (the model's zero state)."""

    def describe(self) -> dict[str, Any]:
        """What GET /v1/adapters/{name} answers."""
        if self.adapter is None:
            return {"name": self.name, "kind": "base", "tokenizer": self.tokenizer.name, "template": self.template.name}
        m = self.adapter.meta
        out = {"name": self.name, "kind": self.adapter.kind, "family": m.family,
               "path": self.path, "packed": Path(self.path).is_file(),
               "base": {k: m.base.get(k) for k in ("fingerprint", "n_layer", "n_embd", "vocab_size")},
               "tokenizer": m.tokenizer, "template": self.template.name}
        if self.adapter.kind == "lora":
            out.update(r=m.r, alpha=m.alpha, scaling=m.scaling, use_rslora=m.use_rslora, parts=m.parts,
                       train=m.train, modules=len(self.adapter.lora))
        if m.recipe:
            out["recipe"] = m.recipe
        return out


# ----------------------------------------------------------------------------------------------------------------------
# The prompt-state cache


def state_bytes(state: RNNState) -> int:
    return sum(t.numel() * t.element_size() for t in state.tensors().values())


class StateCache:
    """(adapter name, token ids) -> (state after those tokens [1 row], logits of the last one), LRU within a byte
    budget. `longest` finds the longest cached prefix of a request's ids."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.entries: OrderedDict[tuple[str, tuple[int, ...]], tuple[RNNState, torch.Tensor, int]] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def put(self, adapter: str, ids: Sequence[int], state: RNNState, logits: torch.Tensor) -> None:
        key = (adapter, tuple(ids))
        size = state_bytes(state) + logits.numel() * logits.element_size() + 8 * len(key[1])
        if size > self.budget:
            return
        if key in self.entries:
            self.bytes -= self.entries.pop(key)[2]
        self.entries[key] = (state.clone(), logits.clone(), size)
        self.bytes += size
        while self.bytes > self.budget:
            _, (_, _, n) = self.entries.popitem(last=False)
            self.bytes -= n

    def longest(self, adapter: str, ids: Sequence[int]) -> tuple[int, RNNState | None, torch.Tensor | None]:
        """(n, state, logits) for the longest cached prefix ids[:n] (n = 0: none). The entry becomes most recent."""
        ids = tuple(ids)
        best = None
        for key in self.entries:  # a few hundred entries at most: a scan is simpler than a trie and fast enough
            name, prefix = key
            if name == adapter and len(prefix) <= len(ids) and (best is None or len(prefix) > len(best[1])) \
                    and ids[:len(prefix)] == prefix:
                best = key
        if best is None:
            self.misses += 1
            return 0, None, None
        self.hits += 1
        self.entries.move_to_end(best)
        state, logits, _ = self.entries[best]
        return len(best[1]), state.clone(), logits.clone()


# ----------------------------------------------------------------------------------------------------------------------
# Requests and streams


@dataclass
class GenerationRequest:
    """One generation: a tokenized prompt for one served name, and its sampling settings."""

    model: str
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    reply_suffix: Callable[[str], str] | None = None
    """Chat: reply text -> the text that follows the prompt in the next turn's rendering (" reply\\n\\n"); the state
    after prompt + that text is cached so that the next turn prefills only its new message."""


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    """Prompt tokens taken from the state cache (not prefilled)."""
    prefilled_tokens: int = 0
    """Prompt tokens run through the model for this request."""
    time_to_first_token: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
                "prefilled_tokens": self.prefilled_tokens}


@dataclass
class Event:
    """What a stream receives: kind "text" (text), "done" (finish_reason, usage) or "error" (text = the reason)."""

    kind: str
    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None


class Stream:
    """A submitted request, as its submitter holds it: events arrive through `on_event` (called from the worker
    thread); `cancel()` takes the row out of the batch at the next token."""

    def __init__(self, request: GenerationRequest, on_event: Callable[[Event], None]) -> None:
        self.request = request
        self.on_event = on_event
        self.cancelled = False
        self.submitted = time.perf_counter()

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class _Row:
    """An active stream in the batch."""

    stream: Stream
    served: ServedAdapter
    text: TextStream
    penalties: Penalties
    generator: torch.Generator | None
    logits: torch.Tensor
    usage: Usage
    state: RNNState | None = None
    """The row's own state until it is stacked into the batch state."""
    index: int | None = None
    """The row's index in the batch state."""
    prompt_state: RNNState | None = None
    """Chat: the state after the prompt, to cache the state after prompt + reply at the end."""
    produced: int = 0


# ----------------------------------------------------------------------------------------------------------------------
# The engine


class Engine:
    """One base model serving every adapter; a worker thread decodes all active streams together."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        dtype = default_dtype(config.device) if config.dtype == "auto" else config.dtype
        self.model = load_model(config.model, dtype=dtype, device=config.device, quant=config.quant).eval()
        self.packed_bytes = pack_linears(self.model) if config.pack_weights else 0
        """Memory the panel-packed copies of the base's linear weights take (`PackedLinear`), 0 where none."""
        self.family = family_for(self.model)
        self.device = self.model.emb.weight.device
        self.vocab_size = self.model.config.vocab_size
        self.base_fingerprint = self.model.base_fingerprint
        sd = self.model.state_dict()
        self.shapes = {k: tuple(v.shape) for k, v in sd.items()}
        self.state_shapes = {k: tuple(v.shape[1:]) for k, v in self.model.zero_state(1, "cpu").tensors().items()}
        self.routing = LoRARouting()
        self.base_name = Path(config.model).stem
        adapter_paths = list(config.adapters.values())
        self._tokenizers: dict[str, Tokenizer] = {}
        """spec -> the one instance every served name with that tokenizer uses (`_shared_tokenizer`)."""
        self.tokenizer = self._shared_tokenizer(resolve_tokenizer(config.tokenizer, adapter_paths, self.vocab_size))
        self.served: dict[str, ServedAdapter] = {
            self.base_name: ServedAdapter(self.base_name, BASE_SLOT, self.tokenizer,
                                          resolve_template("auto", self.tokenizer))}
        self.skipped: dict[str, str] = {}
        """adapters_dir entries that could not be served: name -> the reason (one line)."""
        self._slots = itertools.count(1)
        self._lock = threading.RLock()  # the model: held by the worker for each step, and to plug an adapter in
        for name, path in config.adapters.items():
            self.add_adapter(name, path)
        self.refresh()
        self.cache = StateCache(config.state_cache_bytes)
        self.counters = {"requests": 0, "completed": 0, "cancelled": 0, "errors": 0, "prompt_tokens": 0,
                         "prefilled_tokens": 0, "cached_tokens": 0, "generated_tokens": 0, "steps": 0, "peak_batch": 0}
        self._waiting: queue.Queue[Stream] = queue.Queue()
        self._rows: list[_Row] = []
        self._batch_state: RNNState | None = None
        self._wake = threading.Event()
        self._stop = False
        self._worker = threading.Thread(target=self._run, name="rwkv-lora-serve", daemon=True)
        self._worker.start()

    # ---- adapters

    def resolve(self, name: str) -> ServedAdapter:
        """The served name (the base also answers to "base"); rescans adapters_dir once if unknown."""
        if name == "base":
            name = self.base_name
        if name not in self.served:
            self.refresh()
        if name not in self.served:
            raise KeyError(name)
        return self.served[name]

    def refresh(self) -> None:
        """Serve every adapter in adapters_dir not served yet (a broken one is listed in `skipped`)."""
        if not self.config.adapters_dir:
            return
        root = Path(self.config.adapters_dir)
        if not root.is_dir():
            return
        for path in sorted(root.iterdir()):
            name = path.stem if path.is_file() else path.name
            if name in self.served or name.startswith(".") or not is_adapter(path):
                continue
            try:
                self.add_adapter(name, str(path))
                self.skipped.pop(name, None)
            except Exception as e:  # anyone may drop a file here: one that cannot be served is listed, never fatal
                self.skipped[name] = str(e) if isinstance(e, FinetuneError) else f"{path}: {first_line(e)}"

    def _shared_tokenizer(self, tokenizer: Tokenizer) -> Tokenizer:
        """The instance already serving `tokenizer`'s spec, else `tokenizer`, made ready to decode.

        Why: each World tokenizer parses its 65536-line vocabulary file on its first decode (~1 s here); with an
        instance per adapter, the first request of every adapter waited that long for its first token (and each
        held its own copy of the table). Decoding once now moves that second to startup."""
        if tokenizer.spec not in self._tokenizers:
            tokenizer.decode([0])
            self._tokenizers[tokenizer.spec] = tokenizer
        return self._tokenizers[tokenizer.spec]

    def check(self, adapter: Adapter) -> None:
        """Refuse (one line) an adapter this server cannot serve: another family or base, or full tensors."""
        check_adapter(adapter, self.shapes, self.base_fingerprint, family=self.family, force=self.config.force,
                      state_shapes=self.state_shapes)
        if adapter.full:
            raise FinetuneError(f"adapter {adapter.path} trains {len(adapter.full)} tensors in full "
                                f"({', '.join(sorted(adapter.full)[:2])}, ...), which change the base for every "
                                f"request; the server applies LoRA per request only: merge it (rwkv-lora merge) and "
                                f"serve the merged model")

    def add_adapter(self, name: str, path: str, adapter: Adapter | None = None) -> ServedAdapter:
        """Read, check and plug in an adapter under `name` (one-line FinetuneError if it cannot be served)."""
        if not NAME_RE.match(name):
            raise FinetuneError(f"adapter name {name!r}: use letters, digits, '.', '_' and '-' (at most 64, not "
                                f"starting with '.' or '-')")
        if name in self.served or name == "base":
            raise FinetuneError(f"adapter name {name!r} is already served")
        adapter = adapter if adapter is not None else read_adapter(path)
        self.check(adapter)
        tokenizer = adapter_tokenizer(adapter)
        tokenizer = self.tokenizer if tokenizer is None else self._shared_tokenizer(tokenizer)
        if tokenizer.vocab_size > self.vocab_size:
            raise FinetuneError(f"adapter {path}: its tokenizer has {tokenizer.vocab_size} tokens, the model "
                                f"{self.vocab_size}")
        # the chat format its data was prepared in; plain-text adapters (template none) chat in the tokenizer's
        template = resolve_template(adapter.meta.template, tokenizer) or resolve_template("auto", tokenizer)
        with self._lock:
            slot = next(self._slots)
            for module, (A, B) in adapter.lora.items():
                parent_name, _, child = module.rpartition(".")
                parent = self.model.get_submodule(parent_name) if parent_name else self.model
                lin = getattr(parent, child)
                if not isinstance(lin, MultiLoRALinear):
                    if not isinstance(lin, nn.Linear):
                        raise FinetuneError(f"adapter {path}: {module} is not a linear layer")
                    lin = MultiLoRALinear(lin, self.routing)
                    setattr(parent, child, lin)
                lin.set_slot(slot, A, B, adapter.scaling)
            start = None
            if adapter.state is not None:
                start = adapter.state.to(self.device, torch.float32)
            served = ServedAdapter(name, slot, tokenizer, template, str(path), adapter, start)
            self.served[name] = served
        return served

    # ---- requests

    def submit(self, request: GenerationRequest, on_event: Callable[[Event], None]) -> Stream:
        """Queue a request; its events go to `on_event` (from the worker thread). Raises KeyError for an unknown
        model, FinetuneError for bad settings, OverflowError when too many requests wait."""
        self.resolve(request.model)
        check_sampling(request.temperature, request.top_p, request.top_k, request.presence_penalty,
                       request.frequency_penalty, max_tokens=request.max_tokens)
        if not request.prompt_ids:
            raise FinetuneError("the prompt is empty (nothing to condition on)")
        if self._waiting.qsize() >= self.config.max_waiting:
            raise OverflowError(f"{self._waiting.qsize()} requests are already waiting")
        stream = Stream(request, on_event)
        self.counters["requests"] += 1
        self._waiting.put(stream)
        self._wake.set()
        return stream

    def stats(self) -> dict[str, Any]:
        return {**self.counters, "active": len(self._rows), "waiting": self._waiting.qsize(),
                "cache_entries": len(self.cache.entries), "cache_bytes": self.cache.bytes,
                "cache_hits": self.cache.hits, "cache_misses": self.cache.misses}

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._worker.join(timeout=10)

    # ---- the worker

    def _run(self) -> None:
        while not self._stop:
            if not self._rows and self._waiting.empty():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                with self._lock:
                    self._admit()
                    self._decode_once()
            except Exception as e:  # a bug must not leave clients hanging: fail the batch's streams, keep serving
                for row in self._rows:
                    self._emit(row.stream, Event("error", f"generation failed: {first_line(e)}"))
                self._rows = []
                self._batch_state = None

    def _emit(self, stream: Stream, event: Event) -> None:
        try:
            stream.on_event(event)
        except Exception:  # the submitter is gone (its event loop closed): treat it as a cancellation
            stream.cancel()

    def _prefill(self, served: Sequence[ServedAdapter], ids: Sequence[list[int]],
                 states: Sequence[RNNState | None]) -> tuple[torch.Tensor, RNNState]:
        """Prompts of equal length, row i continuing states[i] (None: its adapter's start state) with adapter
        served[i], through the model together -> (logits of each row's last token [n, V] float32, states [n])."""
        rows = [s if s is not None else a.start_state.expand(1).clone() if a.start_state is not None
                else self.model.zero_state(1, self.device) for a, s in zip(served, states)]
        self.routing.set([a.slot for a in served])
        try:  # chunks of PREFILL_ROWS rows in all: a chunk's activations take no more memory than one prompt's
            logits, state = self.model.prefill(torch.tensor(ids, device=self.device), RNNState.cat(rows),
                                               chunk_len=max(1, PREFILL_ROWS // len(rows)))
        finally:
            self.routing.clear()
        return logits.float(), state

    def _admit(self) -> None:
        """Take waiting streams into the batch; the prompts of the streams admitted together that have the same
        number of tokens left to prefill (after the state cache) are prefilled together, one forward for all."""
        admitted: list[tuple[Stream, ServedAdapter, int, RNNState | None, torch.Tensor | None]] = []
        while len(self._rows) + len(admitted) < self.config.max_batch:
            try:
                stream = self._waiting.get_nowait()
            except queue.Empty:
                break
            if stream.cancelled:
                self.counters["cancelled"] += 1
                continue
            try:
                served = self.resolve(stream.request.model)
            except Exception as e:
                self._fail(stream, e)
                continue
            admitted.append((stream, served, *self.cache.longest(served.name, stream.request.prompt_ids)))
        by_length: dict[int, list[int]] = {}
        for i, (stream, _, n, _, _) in enumerate(admitted):
            left = len(stream.request.prompt_ids) - n
            if left:
                by_length.setdefault(left, []).append(i)
        prefilled: dict[int, tuple[RNNState, torch.Tensor] | Exception] = {}
        for group in by_length.values():
            try:
                logits, state = self._prefill([admitted[i][1] for i in group],
                                              [admitted[i][0].request.prompt_ids[admitted[i][2]:] for i in group],
                                              [admitted[i][3] for i in group])
            except Exception as e:
                prefilled.update((i, e) for i in group)
                continue
            for j, i in enumerate(group):
                prefilled[i] = (state.rows(slice(j, j + 1)), logits[j])
        for i, (stream, served, n, state, logits) in enumerate(admitted):
            req = stream.request
            try:
                if i in prefilled:
                    if isinstance(prefilled[i], Exception):
                        raise prefilled[i]
                    state, logits = prefilled[i]
                    self.cache.put(served.name, req.prompt_ids, state, logits)
                ids = req.prompt_ids
                usage = Usage(prompt_tokens=len(ids), cached_tokens=n, prefilled_tokens=len(ids) - n)
                for k in ("prompt_tokens", "cached_tokens", "prefilled_tokens"):
                    self.counters[k] += getattr(usage, k)
                gen = torch.Generator().manual_seed(req.seed) if req.seed is not None else None
                row = _Row(stream, served, TextStream(served.tokenizer, req.stop),
                           Penalties(req.presence_penalty, req.frequency_penalty, tokenizer=served.tokenizer),
                           gen, logits, usage, state=state)
            except Exception as e:
                self._fail(stream, e)
                continue
            row.prompt_state = state if req.reply_suffix is not None else None
            self._rows.append(row)

    def _fail(self, stream: Stream, e: Exception) -> None:
        self.counters["errors"] += 1
        self._emit(stream, Event("error", first_line(e) if isinstance(e, FinetuneError)
                                 else f"generation failed: {first_line(e)}"))

    def _finish(self, row: _Row, reason: str) -> None:
        rest = row.text.flush()
        if rest:
            self._emit(row.stream, Event("text", rest))
        if row.prompt_state is not None:
            self._cache_reply(row)
        self.counters["completed"] += 1
        self._emit(row.stream, Event("done", finish_reason=reason, usage=row.usage))

    def _cache_reply(self, row: _Row) -> None:
        """Cache the state after prompt + the reply as the next turn renders it (so that turn prefills only its
        new message)."""
        req = row.stream.request
        suffix = row.served.tokenizer.encode(req.reply_suffix(row.text.text))
        if not suffix:
            return
        logits, state = self._prefill([row.served], [suffix], [row.prompt_state])
        self.cache.put(row.served.name, list(req.prompt_ids) + suffix, state, logits[0])

    def _decode_once(self) -> None:
        """Sample one token for every row, retire finished rows, step the rest together."""
        keep: list[_Row] = []
        tokens: list[int] = []
        for row in self._rows:
            if row.stream.cancelled:
                self.counters["cancelled"] += 1
                continue
            req = row.stream.request
            try:
                token = sample_logits(row.penalties.apply(row.logits), req.temperature, req.top_p, req.top_k,
                                      row.generator)
            except FinetuneError as e:
                self.counters["errors"] += 1
                self._emit(row.stream, Event("error", str(e)))
                continue
            if row.usage.time_to_first_token is None:
                row.usage.time_to_first_token = time.perf_counter() - row.stream.submitted
            if token == 0:  # end of document
                self._finish(row, "stop")
                continue
            row.produced += 1
            row.usage.completion_tokens = row.produced
            self.counters["generated_tokens"] += 1
            out = row.text.push(token)
            if out:
                self._emit(row.stream, Event("text", out))
            if row.text.stopped:
                self._finish(row, "stop")
                continue
            if row.produced >= req.max_tokens:
                self._finish(row, "length")
                continue
            row.penalties.update(token)
            keep.append(row)
            tokens.append(token)
        # the batch state: rows that were in the last step keep theirs, new rows bring their prefilled state
        parts = [self._batch_state.rows(slice(r.index, r.index + 1)) if r.state is None else r.state
                 for r in keep]
        self._rows = keep
        if not keep:
            self._batch_state = None
            return
        state = RNNState.cat(parts) if len(parts) > 1 else parts[0]
        self.routing.set([r.served.slot for r in keep])
        try:
            logits, self._batch_state = self.model.step(torch.tensor(tokens, device=self.device), state)
        finally:
            self.routing.clear()
        self.counters["steps"] += 1
        self.counters["peak_batch"] = max(self.counters["peak_batch"], len(keep))
        logits = logits.float()
        for i, row in enumerate(keep):
            row.index, row.state, row.logits = i, None, logits[i]
