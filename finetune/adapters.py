"""Adapters: LoRA injected with `peft`, plus the small RWKV tensors trained in full; saved so they describe themselves.

An adapter directory (what training writes to OUT_DIR/final/ and OUT_DIR/step-N/):

    adapter_config.json          peft's own config (r, lora_alpha, target_modules, ...): PeftModel.from_pretrained
    adapter_model.safetensors    peft's own LoRA weights (keys base_model.model.blocks.N.att.key.lora_A.weight, ...)
    trained_tensors.safetensors  the tensors trained in full, under their checkpoint names (blocks.N.att.time_decay,
                                 blocks.N.ln1.weight, emb.weight, ...); absent when none were
    rwkv_lora.json               our metadata: format, kind, base (fingerprint, n_layer, n_embd, vocab_size,
                                 dim_ffn), tokenizer, r, alpha, dropout, use_rslora, scaling, parts, train, recipe

A state adapter (kind "state", from `train_type: state`) holds instead:

    state.safetensors            the learned start state (model.initial_state), float32, unbatched: `att_shift`
                                 [L, C], `wkv` [L, ...] (the family's WKV state), `ffn_shift` [L, C]
    rwkv_lora.json               format, version, kind "state", family, base, tokenizer, recipe

Merging and plug-in read `rwkv_lora.json` and never ask the user for alpha.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn

from finetune import checkpoint
from finetune.checkpoint import all_finite
from finetune.atomic import atomic_dir, atomic_file, check_output
from finetune.errors import FinetuneError
from finetune.models import FAMILIES, Family, RNNState, family_for
from finetune.quant import linear as quant_linear, load_model as load_quantized
from finetune.tensorfiles import save_safetensors

ADAPTER_META = "rwkv_lora.json"
TRAINED_TENSORS = "trained_tensors.safetensors"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
STATE_TENSORS = "state.safetensors"
FORMAT = "rwkv-lora-adapter"
FORMAT_VERSION = 1
TOKENIZER_FILE = "tokenizer.json"  # the tokenizer an adapter carries (packed: a header entry of that name)
TOKENIZER_HASH = "tokenizer.json sha256:"

# RWKV-4's LoRA parts and trainable groups (what RWKV-LM-LoRA files, which are RWKV-4's, are described with); every
# other use asks the model's own family (`finetune.models.family_for`)
LORA_PARTS: dict[str, tuple[str, ...]] = FAMILIES["4"].lora_parts
FULL_GROUPS = FAMILIES["4"].full_groups


def lora_target_regex(parts: Iterable[str], family: Family = FAMILIES["4"]) -> str:
    """A regex for peft's `target_modules` that matches exactly the chosen projections of `family` (full-name
    match)."""
    alts = []
    for part in parts:
        if part not in family.lora_parts:
            raise FinetuneError(f"unknown LoRA part {part!r} for {family.title}; choose from "
                                f"{', '.join(family.lora_parts)}")
        alts.append(rf"blocks\.\d+\.{part}\.({'|'.join(family.lora_parts[part])})")
    return "^(" + "|".join(alts) + ")$"


def full_tensor_names(names: Iterable[str], groups: Iterable[str], family: Family = FAMILIES["4"]) -> list[str]:
    """Checkpoint names of the tensors trained in full for the given groups (time, ln, emb, head) of `family`."""
    groups = list(groups)
    for g in groups:
        if g not in family.full_groups:
            raise FinetuneError(f"unknown trainable group {g!r}; choose from {', '.join(family.full_groups)}")
    return [n for n in names if any(family.full_groups[g](n) for g in groups)]


def add_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0, parts: Iterable[str] = ("att", "ffn"),
             train: Iterable[str] = (), use_rslora: bool = False, init: str = "default"):
    """Wrap an RWKV in a peft LoRA model: everything frozen except LoRA and the `train` groups.

    init: "default" (peft: A kaiming-uniform, B zeros), "gaussian", or "pissa" (peft's names).
    Returns the `peft.PeftModel`; the RWKV itself is `unwrap(peft_model)`.
    """
    from peft import LoraConfig, get_peft_model

    parts = list(parts)
    init_lora_weights: Any = {"default": True, "gaussian": "gaussian", "pissa": "pissa"}.get(init)
    if init_lora_weights is None:
        raise FinetuneError(f"unknown LoRA init {init!r}; choose from default, gaussian, pissa")
    for p in model.parameters():
        p.requires_grad_(False)
    if parts and r > 0:
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                            target_modules=lora_target_regex(parts, family_for(model)),
                            use_rslora=use_rslora, init_lora_weights=init_lora_weights, bias="none")
        with warnings.catch_warnings():  # peft's note on torchao weights is about peft's own merge, never used here
            warnings.filterwarnings("ignore", message=".*get_apply_tensor_subclass.*")
            peft_model = get_peft_model(model, config)
    else:
        raise FinetuneError("LoRA needs r > 0 and at least one part (att, ffn)")
    base = unwrap(peft_model)
    for name in full_tensor_names(dict(base.named_parameters()), train, family_for(base)):
        base.get_parameter(name).requires_grad_(True)
    return peft_model


def unwrap(model: nn.Module) -> nn.Module:
    """The RWKV inside a peft wrapper (or the model itself). Its parameter names are `blocks.N.att.key.base_layer...`
    once LoRA is injected; `base_state_dict` gives them back under checkpoint names."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def trained_full_tensors(peft_model: nn.Module, groups: Iterable[str]) -> dict[str, torch.Tensor]:
    """The fully trained tensors, under checkpoint names, float32 on the CPU."""
    base = unwrap(peft_model)
    params = dict(base.named_parameters())
    return {n: params[n].detach().float().cpu().contiguous()
            for n in full_tensor_names(params, groups, family_for(base))}


def save_adapter(peft_model: nn.Module, out_dir: str | Path, meta: dict[str, Any]) -> Path:
    """Write an adapter directory atomically (a temp dir renamed into place; an older one is replaced).

    meta must hold at least: base (dict with fingerprint and shapes), tokenizer, r, alpha, parts, train; the
    format/version/kind/scaling fields are filled in here.
    """
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        peft_model.save_pretrained(str(tmp), safe_serialization=True)
        full = trained_full_tensors(peft_model, meta.get("train", ()))
        if full:
            save_safetensors(full, tmp / TRAINED_TENSORS)
        cfg = next(iter(peft_model.peft_config.values()))
        meta = dict(meta)
        meta["tokenizer"], tokenizer_json = tokenizer_record(meta.get("tokenizer"))
        if tokenizer_json is not None:
            (tmp / TOKENIZER_FILE).write_bytes(tokenizer_json)
        meta.update(format=FORMAT, version=FORMAT_VERSION, kind=meta.get("kind", "lora"),
                    r=cfg.r, alpha=cfg.lora_alpha, use_rslora=bool(cfg.use_rslora),
                    scaling=lora_scaling(cfg.r, cfg.lora_alpha, bool(cfg.use_rslora)),
                    trained_tensors=sorted(full))
        (tmp / ADAPTER_META).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return out_dir


def tokenizer_record(spec: str | None) -> tuple[str | None, bytes | None]:
    """What an adapter records for a tokenizer setting, and the file it carries: "world" (built in), or for a
    tokenizer.json path its content hash "tokenizer.json sha256:<hex>" and the file itself, so that the adapter
    finds its tokenizer wherever it is used. Anything else (an identity already, e.g. a data manifest's) is kept."""
    if spec is None:
        return None, None
    spec = str(spec)
    if spec == "world":
        return "world", None
    path = Path(spec)
    if path.is_file():
        try:
            data = path.read_bytes()
        except OSError as e:
            raise FinetuneError(f"{path}: cannot read the tokenizer ({e.strerror})") from None
        return TOKENIZER_HASH + hashlib.sha256(data).hexdigest(), data
    return spec, None


def _check_tokenizer(meta: dict[str, Any], data: bytes | None, where: Path) -> bytes | None:
    record = meta.get("tokenizer")
    if data is None:
        return None
    if not (isinstance(record, str) and record.startswith(TOKENIZER_HASH)):
        raise FinetuneError(f"{where}: carries a tokenizer.json but records tokenizer {record!r}")
    if hashlib.sha256(data).hexdigest() != record[len(TOKENIZER_HASH):]:
        raise FinetuneError(f"{where}: its tokenizer.json does not match the sha256 the adapter records; the adapter "
                            f"is damaged or was edited")
    return data


def adapter_tokenizer_json(a: "Adapter") -> str | None:
    """The text of the tokenizer.json an adapter was trained with: the one it carries, or (adapters from before
    tokenizers travelled with them) the file its record names when that exists here. None for World and when
    unknown."""
    if a.tokenizer_json is not None:
        return a.tokenizer_json.decode("utf-8")
    record = a.meta.get("tokenizer")
    if isinstance(record, str) and record.endswith(".json") and Path(record).is_file():
        return Path(record).read_text(encoding="utf-8")
    return None


def adapter_tokenizer(a: "Adapter"):
    """The adapter's tokenizer as a `finetune.tokenizer.Tokenizer`, or None when it records none. One-line
    FinetuneError when it records one it does not carry and that is not here."""
    from finetune.tokenizer import load_tokenizer

    record = a.meta.get("tokenizer")
    if record is None:
        return None
    if record == "world" or str(record).startswith("world"):
        return load_tokenizer("world")
    if a.tokenizer_json is not None and Path(a.path).is_dir():
        return load_tokenizer(str(Path(a.path) / TOKENIZER_FILE))
    text = adapter_tokenizer_json(a)
    if text is None:
        raise FinetuneError(f"adapter {a.path}: records tokenizer {record!r} but does not carry it and no such file "
                            f"is here; pass --tokenizer")
    with tempfile.TemporaryDirectory() as tmp:  # a packed adapter: the tokenizer is read once, from a private copy
        path = Path(tmp) / TOKENIZER_FILE
        path.write_text(text, encoding="utf-8")
        return load_tokenizer(str(path))


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """What multiplies B @ A: alpha / r, or alpha / sqrt(r) with rank-stabilised LoRA."""
    return alpha / (r ** 0.5) if use_rslora else alpha / r


@dataclass
class Adapter:
    """An adapter as read from disk, independent of peft: everything merging and plug-in need."""

    path: Path
    meta: dict[str, Any]
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """module name (blocks.N.att.key) -> (A [r, in], B [out, r]), float32."""
    full: dict[str, torch.Tensor] = field(default_factory=dict)
    """checkpoint name -> tensor trained in full (replaces the base tensor), float32."""
    state: RNNState | None = None
    """kind "state": the learned start state (unbatched, [L, ...] per field), float32."""
    tokenizer_json: bytes | None = None
    """The tokenizer.json the adapter carries (its `tokenizer` record is then "tokenizer.json sha256:<hex>")."""

    @property
    def kind(self) -> str:
        return str(self.meta.get("kind", "lora"))

    @property
    def scaling(self) -> float:
        return float(self.meta["scaling"])

    def delta(self, module: str) -> torch.Tensor:
        """scaling * B @ A for one adapted module, float32."""
        A, B = self.lora[module]
        return self.scaling * (B @ A)


def adapter_files(path: str | Path) -> list[Path]:
    """The adapter itself and every file it is made of: what a command reading it must never write over."""
    path = Path(path)
    if path.is_dir():
        return [path, *sorted(p for p in path.iterdir() if p.is_file())]
    return [path]


def is_adapter(path: str | Path) -> bool:
    """An adapter directory or a packed adapter file (see `pack_adapter`)."""
    path = Path(path)
    return (path / ADAPTER_META).is_file() or is_packed(path)


def read_adapter(path: str | Path) -> Adapter:
    """Read an adapter directory or packed file (safetensors only; nothing is unpickled) and check it: its metadata
    (r, alpha and the scaling they imply), its ranks and that every value is finite. One-line FinetuneError on any
    problem."""
    return _validated(_read(Path(path)))


def _validated(a: Adapter) -> Adapter:
    where = a.path
    kind = a.meta.get("kind", "lora")
    if kind not in ("lora", "state"):
        raise FinetuneError(f"{where}: unknown adapter kind {kind!r} (lora or state)")
    if kind == "lora":
        r, alpha, rslora, scaling = (a.meta.get(k) for k in ("r", "alpha", "use_rslora", "scaling"))
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise FinetuneError(f"{where}: r must be a positive integer, got {r!r}")
        if not _is_number(alpha) or not math.isfinite(alpha) or alpha <= 0:
            raise FinetuneError(f"{where}: alpha must be a positive number, got {alpha!r}")
        if not isinstance(rslora if rslora is not None else False, bool):
            raise FinetuneError(f"{where}: use_rslora must be true or false, got {rslora!r}")
        expected = lora_scaling(r, alpha, bool(rslora))
        # the scaling is recorded for readers, and must say what r and alpha say: a damaged or edited file that
        # disagrees with itself is refused rather than merged with a made-up strength
        if not _is_number(scaling) or not math.isfinite(scaling) or not math.isclose(scaling, expected,
                                                                                     rel_tol=1e-6):
            raise FinetuneError(f"{where}: scaling {scaling!r} contradicts r={r}, alpha={alpha:g}"
                                f"{' (rsLoRA)' if rslora else ''}, which give {expected:g}; the adapter is damaged "
                                f"or was edited")
        for module, (A, _) in a.lora.items():
            if A.shape[0] != r:
                raise FinetuneError(f"{where}: {module} has rank {A.shape[0]} but the adapter says r={r}")
    tensors = [(f"{m}.lora_A", A) for m, (A, _) in a.lora.items()] + \
              [(f"{m}.lora_B", B) for m, (_, B) in a.lora.items()] + list(a.full.items())
    if a.state is not None:
        tensors += [(f"state.{k}", v) for k, v in a.state.tensors().items()]
    for name, t in tensors:
        if not all_finite(t):
            raise FinetuneError(f"{where}: {name} holds NaN or infinite values; the adapter is damaged (was its "
                                f"training diverging?)")
    return a


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _read(path: Path) -> Adapter:
    from safetensors.torch import load_file

    if not path.exists():
        raise FinetuneError(f"{path}: no such adapter")
    if path.is_file():
        return _read_packed(path)
    if not is_adapter(path):
        raise FinetuneError(f"{path}: not an rwkv-lora adapter (no {ADAPTER_META})")
    try:
        meta = json.loads((path / ADAPTER_META).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FinetuneError(f"{path / ADAPTER_META}: unreadable adapter metadata ({e})") from None
    if meta.get("format") != FORMAT:
        raise FinetuneError(f"{path / ADAPTER_META}: not an rwkv-lora adapter (format {meta.get('format')!r})")
    tokenizer_json = None
    if (path / TOKENIZER_FILE).is_file():
        try:
            tokenizer_json = (path / TOKENIZER_FILE).read_bytes()
        except OSError as e:
            raise FinetuneError(f"{path / TOKENIZER_FILE}: unreadable ({e.strerror})") from None
    tokenizer_json = _check_tokenizer(meta, tokenizer_json, path)
    if meta.get("kind") == "state":
        return Adapter(path=path, meta=meta, state=_read_state(path / STATE_TENSORS, meta),
                       tokenizer_json=tokenizer_json)
    lora: dict[str, list] = {}
    weights = path / PEFT_WEIGHTS
    if weights.exists():
        try:
            tensors = load_file(str(weights))
        except Exception as e:
            raise FinetuneError(f"{weights}: corrupted or truncated adapter weights ({str(e).splitlines()[0]})") \
                from None
        for key, t in tensors.items():
            # base_model.model.blocks.0.att.key.lora_A.weight -> blocks.0.att.key, A
            name = key.removeprefix("base_model.model.")
            for which in ("lora_A", "lora_B"):
                marker = f".{which}."
                if marker in name:
                    module = name.split(marker)[0]
                    lora.setdefault(module, [None, None])[0 if which == "lora_A" else 1] = t.float()
                    break
            else:
                raise FinetuneError(f"{weights}: unexpected tensor {key}")
    pairs = _check_pairs(lora, weights)
    full = {}
    if (path / TRAINED_TENSORS).exists():
        try:
            full = {k: v.float() for k, v in load_file(str(path / TRAINED_TENSORS)).items()}
        except Exception as e:
            raise FinetuneError(f"{path / TRAINED_TENSORS}: corrupted or truncated ({str(e).splitlines()[0]})") \
                from None
    if not pairs and not full:
        # applying nothing and reporting success would be a silent wrong result
        if (path / "adapter_model.bin").exists():
            raise FinetuneError(f"{path}: no LoRA tensors found (adapter_model.bin is a pickle and is never loaded; "
                                f"save the adapter with safetensors)")
        raise FinetuneError(f"{path}: no LoRA tensors found (no {PEFT_WEIGHTS} or {TRAINED_TENSORS})")
    return Adapter(path=path, meta=meta, lora=pairs, full=full, tokenizer_json=tokenizer_json)


def save_state_adapter(state: RNNState, out_dir: str | Path, meta: dict[str, Any]) -> Path:
    """Write a state adapter directory (state.safetensors + rwkv_lora.json), atomically. `state` is unbatched."""
    out_dir = Path(out_dir)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in state.tensors().items()}
    for k, v in tensors.items():
        if not torch.isfinite(v).all():
            raise FinetuneError(f"{out_dir}: the learned state's {k} is not finite; nothing written")
    with atomic_dir(out_dir) as tmp:
        save_safetensors(tensors, tmp / STATE_TENSORS)
        meta = dict(meta)
        meta["tokenizer"], tokenizer_json = tokenizer_record(meta.get("tokenizer"))
        if tokenizer_json is not None:
            (tmp / TOKENIZER_FILE).write_bytes(tokenizer_json)
        meta.update(format=FORMAT, version=FORMAT_VERSION, kind="state",
                    state_shapes={k: list(v.shape) for k, v in tensors.items()})
        (tmp / ADAPTER_META).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return out_dir


def _read_state(path: Path, meta: dict[str, Any]) -> torch.Tensor:
    from safetensors.torch import load_file

    if not path.is_file():
        raise FinetuneError(f"{path}: missing (a state adapter keeps its start state there)")
    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise FinetuneError(f"{path}: corrupted or truncated ({_first_line(e)})") from None
    return _check_state(tensors, path)


def _check_state(tensors: dict[str, torch.Tensor], where: Path) -> RNNState:
    """The unbatched RNNState from its three named tensors; one line if any is missing, misshapen or not finite."""
    missing = [f for f in RNNState.FIELDS if f not in tensors]
    if missing or set(tensors) - set(RNNState.FIELDS):
        raise FinetuneError(f"{where}: a state adapter holds exactly the tensors {', '.join(RNNState.FIELDS)}; got "
                            f"{', '.join(sorted(tensors)) or 'none'}")
    state = RNNState(*(tensors[f].float() for f in RNNState.FIELDS))
    L = state.att_shift.shape[0]
    if state.att_shift.dim() != 2 or state.ffn_shift.shape != state.att_shift.shape or state.wkv.shape[0] != L:
        raise FinetuneError(f"{where}: inconsistent state shapes {[tuple(t.shape) for t in state.tensors().values()]}")
    for k, v in state.tensors().items():
        if not torch.isfinite(v).all():
            raise FinetuneError(f"{where}: the state's {k} holds NaN or infinite values")
    return state


def describe_adapter(path: str | Path) -> str:
    a = read_adapter(path)
    m = a.meta
    base = m.get("base", {})
    if a.kind == "state":
        n_layer, C = a.state.att_shift.shape
        numbers = sum(t.numel() for t in a.state.tensors().values())
        wkv = " x ".join(str(d) for d in a.state.wkv.shape[1:])
        return "\n".join([
            f"file:        {path}",
            f"kind:        state adapter (rwkv-lora format {m.get('version')}, "
            f"{'packed file' if Path(path).is_file() else 'directory'}): a learned start state",
            f"family:      {m.get('family', 'rwkv4')}",
            f"state:       {n_layer} layers: token shifts of {C}, WKV {wkv} ({numbers:,} numbers)",
            f"base:        {base.get('n_layer')} x {base.get('n_embd')}, vocab {base.get('vocab_size')}, "
            f"fingerprint {base.get('fingerprint')}",
            f"tokenizer:   {m.get('tokenizer')}",
        ])
    return "\n".join([
        f"file:        {path}",
        f"kind:        {m.get('kind', 'lora')} adapter (rwkv-lora format {m.get('version')}, "
        f"{'packed file' if Path(path).is_file() else 'directory'})",
        f"rank:        {m.get('r')}   alpha: {m.get('alpha')}   scaling: {m.get('scaling'):.4g}"
        + ("   (rsLoRA)" if m.get("use_rslora") else ""),
        f"parts:       {', '.join(m.get('parts', [])) or '-'}   trained in full: {', '.join(m.get('train', [])) or '-'}",
        f"modules:     {len(a.lora)} LoRA pairs, {len(a.full)} full tensors",
        f"base:        {base.get('n_layer')} x {base.get('n_embd')}, vocab {base.get('vocab_size')}, "
        f"fingerprint {base.get('fingerprint')}",
        f"tokenizer:   {m.get('tokenizer')}",
    ])


def _check_pairs(lora: dict[str, list], where: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    pairs = {}
    for module, (A, B) in lora.items():
        if A is None or B is None:
            raise FinetuneError(f"{where}: {module} has only one of lora_A / lora_B")
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise FinetuneError(f"{where}: rank mismatch for {module}: A is {tuple(A.shape)}, B is {tuple(B.shape)}")
        pairs[module] = (A, B)
    return pairs


# ----------------------------------------------------------------------------------------------------------------------
# Packed adapters: one safetensors file for sharing
#
# Tensors: `lora.<module>.A` [r, in], `lora.<module>.B` [out, r], `full.<checkpoint name>`. Header metadata (strings):
# `format` = rwkv-lora-adapter, `packed` = "1", and every field of rwkv_lora.json as a JSON string under its own name
# (base, r, alpha, scaling, parts, train, tokenizer, recipe, ...), plus `rwkv_lora` = the whole JSON document.

PACKED_SUFFIX = ".safetensors"


def _safetensors_header(path: Path) -> dict[str, Any] | None:
    """The JSON header of a safetensors file, or None when it is not one (read without loading any tensor)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                return None
            n = int.from_bytes(head, "little")
            if n <= 0 or n > 100_000_000:
                return None
            raw = f.read(n)
        if len(raw) != n:
            return None
        header = json.loads(raw)
        return header if isinstance(header, dict) else None
    except (OSError, ValueError):
        return None


def is_packed(path: str | Path) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    header = _safetensors_header(path)
    return bool(header) and (header.get("__metadata__") or {}).get("format") == FORMAT


def pack_adapter(src: str | Path, out: str | Path, force: bool = False) -> Path:
    """Write an adapter (directory or packed file) as one packed `.safetensors` file, atomically. An existing `out`
    is replaced only with `force`; the adapter's own files never are."""
    out = check_output(out, force=force, inputs=adapter_files(src))
    a = read_adapter(src)
    tensors: dict[str, torch.Tensor] = {}
    for module, (A, B) in sorted(a.lora.items()):
        tensors[f"lora.{module}.A"] = A.contiguous()
        tensors[f"lora.{module}.B"] = B.contiguous()
    for name, t in sorted(a.full.items()):
        tensors[f"full.{name}"] = t.contiguous()
    if a.state is not None:
        for k, v in a.state.tensors().items():
            tensors[f"state.{k}"] = v.contiguous()
    meta = {k: json.dumps(v, default=str) for k, v in a.meta.items() if k not in ("format",)}
    meta.update(format=FORMAT, packed="1", rwkv_lora=json.dumps(a.meta, default=str))
    if a.tokenizer_json is not None:
        meta[TOKENIZER_FILE] = a.tokenizer_json.decode("utf-8")  # the tokenizer travels in the header
    with atomic_file(out) as tmp:
        save_safetensors(tensors, tmp, metadata=meta)
    return out


def _read_packed(path: Path) -> Adapter:
    from safetensors import safe_open

    header = _safetensors_header(path)
    if header is None:
        raise FinetuneError(f"{path}: not an rwkv-lora adapter (not a safetensors file, or truncated)")
    md = header.get("__metadata__") or {}
    if md.get("format") != FORMAT:
        raise FinetuneError(f"{path}: not an rwkv-lora adapter (a safetensors file without rwkv-lora metadata; "
                            f"is it a model checkpoint?)")
    try:
        meta = json.loads(md["rwkv_lora"])
        if not isinstance(meta, dict):
            raise ValueError("not an object")
    except (KeyError, ValueError) as e:
        raise FinetuneError(f"{path}: unreadable adapter metadata ({e})") from None
    lora: dict[str, list] = {}
    full: dict[str, torch.Tensor] = {}
    state: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key).float()
                if key.startswith("state.") and meta.get("kind") == "state":
                    state[key[6:]] = t
                elif key.startswith("full."):
                    full[key[5:]] = t
                elif key.startswith("lora.") and key.endswith((".A", ".B")):
                    lora.setdefault(key[5:-2], [None, None])[0 if key.endswith(".A") else 1] = t
                else:
                    raise FinetuneError(f"{path}: unexpected tensor {key}")
    except FinetuneError:
        raise
    except Exception as e:
        raise FinetuneError(f"{path}: corrupted or truncated adapter file ({_first_line(e)})") from None
    tokenizer_json = md[TOKENIZER_FILE].encode("utf-8") if TOKENIZER_FILE in md else None
    tokenizer_json = _check_tokenizer(meta, tokenizer_json, path)
    if meta.get("kind") == "state":
        return Adapter(path=path, meta=meta, state=_check_state(state, path), tokenizer_json=tokenizer_json)
    if not lora and not full:
        raise FinetuneError(f"{path}: no LoRA tensors found in the packed adapter")
    return Adapter(path=path, meta=meta, lora=_check_pairs(lora, path), full=full, tokenizer_json=tokenizer_json)


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:200]


# ----------------------------------------------------------------------------------------------------------------------
# Writing an adapter directory from plain tensors (import from other tools)


def peft_config(r: int, alpha: float, use_rslora: bool, modules: list[str], dropout: float = 0.0) -> dict[str, Any]:
    """adapter_config.json as peft writes it for our LoRA (the keys `LoraConfig` needs; the rest take peft's
    defaults), so that `PeftModel.from_pretrained` loads the directory; written without importing peft."""
    return {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
            "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "use_rslora": use_rslora, "bias": "none",
            "target_modules": modules, "fan_in_fan_out": False, "init_lora_weights": True, "modules_to_save": None}


def write_adapter_dir(out_dir: str | Path, meta: dict[str, Any], lora: dict[str, tuple[torch.Tensor, torch.Tensor]],
                      full: dict[str, torch.Tensor], tokenizer_json: bytes | None = None) -> Path:
    """Write our adapter directory format from (A, B) pairs and full tensors, without a model (atomic).

    meta needs base, tokenizer, r, alpha, parts, train; scaling is alpha / r unless meta says use_rslora. A
    tokenizer given as a tokenizer.json path is recorded by its hash and copied in (`tokenizer_record`), as is
    `tokenizer_json` (the content of the file `meta["tokenizer"]` records by hash).
    """
    out_dir = Path(out_dir)
    r, alpha = int(meta["r"]), float(meta["alpha"])
    use_rslora = bool(meta.get("use_rslora", False))
    meta = dict(meta)
    if tokenizer_json is None:
        meta["tokenizer"], tokenizer_json = tokenizer_record(meta.get("tokenizer"))
    _check_tokenizer(meta, tokenizer_json, out_dir)
    meta.update(format=FORMAT, version=FORMAT_VERSION, kind=meta.get("kind", "lora"), r=r, alpha=alpha,
                use_rslora=use_rslora, scaling=lora_scaling(r, alpha, use_rslora), trained_tensors=sorted(full))
    _validated(Adapter(path=out_dir, meta=meta, lora=dict(lora), full=dict(full)))  # nothing non-finite is written
    with atomic_dir(out_dir) as tmp:
        if tokenizer_json is not None:
            (tmp / TOKENIZER_FILE).write_bytes(tokenizer_json)
        if lora:
            config = peft_config(r, alpha, use_rslora, sorted(lora), meta.get("dropout") or 0.0)
            (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
            tensors = {}
            for module, (A, B) in lora.items():
                tensors[f"base_model.model.{module}.lora_A.weight"] = A.float().contiguous()
                tensors[f"base_model.model.{module}.lora_B.weight"] = B.float().contiguous()
            save_safetensors(tensors, tmp / PEFT_WEIGHTS, metadata={"format": "pt"})
        if full:
            save_safetensors({k: v.float().contiguous() for k, v in full.items()}, tmp / TRAINED_TENSORS)
        (tmp / ADAPTER_META).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return out_dir


# ----------------------------------------------------------------------------------------------------------------------
# Checking an adapter against a base, and plugging adapters in without merging


def parse_adapter_spec(spec) -> tuple[str, float]:
    """`DIR`, `DIR:0.5`, `(DIR, 0.5)` or an Adapter -> (path or Adapter, weight)."""
    if isinstance(spec, (tuple, list)):
        if len(spec) != 2:
            raise FinetuneError(f"adapter spec {spec!r}: expected (path, weight)")
        return spec[0], _finite_weight(float(spec[1]), spec[0])
    if isinstance(spec, Adapter):
        return spec, 1.0
    text = str(spec)
    if ":" in text and not Path(text).exists():
        head, _, tail = text.rpartition(":")
        try:
            return head, _finite_weight(float(tail), spec)
        except ValueError:
            pass
    return text, 1.0


def _finite_weight(w: float, spec: Any) -> float:
    if not math.isfinite(w):
        raise FinetuneError(f"adapter {spec}: the weight must be a finite number, got {w}")
    return w


def check_adapter(adapter: Adapter, shapes: dict[str, tuple[int, ...]], base_fingerprint: str | None,
                  force: bool = False, base_name: str = "the base model",
                  state_shapes: dict[str, tuple[int, ...]] | None = None) -> None:
    """Refuse (one-line FinetuneError naming the adapter) an adapter whose target keys or shapes are not in the base,
    or whose recorded base fingerprint differs (unless force=True: then only the shapes must fit)."""
    name = adapter.path
    for module, (A, B) in adapter.lora.items():
        key = f"{module}.weight"
        if key not in shapes:
            raise FinetuneError(f"adapter {name}: unknown target {module} (no {key} in {base_name})")
        want = tuple(shapes[key])
        if len(want) != 2 or (B.shape[0], A.shape[1]) != want:
            raise FinetuneError(f"adapter {name} was made for another base: {module} is {B.shape[0]} x {A.shape[1]} "
                                f"in the adapter but {want} in {base_name}")
    for key, t in adapter.full.items():
        if key not in shapes:
            raise FinetuneError(f"adapter {name}: unknown tensor {key} (not in {base_name})")
        if tuple(t.shape) != tuple(shapes[key]):
            raise FinetuneError(f"adapter {name} was made for another base: {key} is {tuple(t.shape)} in the "
                                f"adapter but {tuple(shapes[key])} in {base_name}")
    if adapter.state is not None:
        if state_shapes is None:
            raise FinetuneError(f"adapter {name}: a state adapter plugs into a model (it cannot be merged)")
        for k, t in adapter.state.tensors().items():
            if tuple(t.shape) != tuple(state_shapes[k]):
                raise FinetuneError(f"adapter {name} was made for another base: its start state's {k} is "
                                    f"{tuple(t.shape)}, {base_name} needs {tuple(state_shapes[k])}")
    recorded = (adapter.meta.get("base") or {}).get("fingerprint")
    if not recorded and not force:
        raise FinetuneError(f"adapter {name} does not record which base it was made for (no base fingerprint); "
                            f"pass --force (force=True) to apply it to {base_name} anyway")
    if recorded and base_fingerprint and recorded != base_fingerprint and not force:
        raise FinetuneError(f"adapter {name} was made for another base (fingerprint {recorded}, {base_name} has "
                            f"{base_fingerprint}); pass --force (force=True) to apply it anyway")


class LoRALinear(nn.Linear):
    """An nn.Linear plus unmerged LoRA deltas: y = x W^T + sum_i w_i s_i (x A_i^T) B_i^T.

    The adapters' factors are concatenated (A: [sum r, in], B: [out, sum r] with w_i * s_i folded into B), so any
    number of adapters costs two thin matmuls. The weight is the original Parameter: the state dict is unchanged.
    """

    def __init__(self, base: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.register_buffer("lora_A", None, persistent=False)
        self.register_buffer("lora_B", None, persistent=False)

    def add(self, A: torch.Tensor, B: torch.Tensor, factor: float) -> None:
        dtype, device = self.weight.dtype, self.weight.device
        A = A.to(device=device, dtype=dtype)
        B = (B.float() * factor).to(device=device, dtype=dtype)
        self.lora_A = A if self.lora_A is None else torch.cat([self.lora_A, A], 0)
        self.lora_B = B if self.lora_B is None else torch.cat([self.lora_B, B], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = quant_linear(x, self.weight, self.bias)  # F.linear, or dequantize-and-multiply for a quantized base
        if self.lora_A is not None:
            y = y + nn.functional.linear(nn.functional.linear(x, self.lora_A), self.lora_B)
        return y


def attach_adapters(model: nn.Module, adapters: Iterable, force: bool = False) -> nn.Module:
    """Plug adapters into an RWKV without merging: `[DIR, (DIR2, 0.5), "FILE.safetensors:0.3"]`.

    Each adapted nn.Linear becomes a `LoRALinear` adding weight * scaling * B(A(x)); fully trained tensors are
    replaced in place as a merge would (W + weight * (T - W)). Every adapter is checked against the model first
    (target keys, shapes, base fingerprint; see `check_adapter`). Returns the model in eval mode.
    """
    specs = [parse_adapter_spec(s) for s in adapters]
    read = [(a if isinstance(a, Adapter) else read_adapter(a), w) for a, w in specs]
    if not read:
        return model.eval()
    base_fp = getattr(model, "base_fingerprint", None)
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith(("lora_A", "lora_B"))}
    if base_fp is None:
        base_fp = checkpoint.fingerprint(sd)
        model.base_fingerprint = base_fp
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    family = family_for(model)
    state_shapes = {k: tuple(v.shape[1:]) for k, v in model.zero_state(1, "cpu").tensors().items()}
    for a, _ in read:
        if a.meta.get("family", "rwkv4") != family.name:
            raise FinetuneError(f"adapter {a.path} was made for a {a.meta.get('family')} model, not "
                                f"{family.title}")
        check_adapter(a, shapes, base_fp, force=force, state_shapes=state_shapes)
    states = [(a, w) for a, w in read if a.state is not None]
    if len(states) > 1:
        raise FinetuneError(f"adapters {states[0][0].path} and {states[1][0].path} are both state adapters; a model "
                            f"has one start state")
    if states and states[0][1] != 1.0:
        raise FinetuneError(f"adapter {states[0][0].path}: a state adapter takes no weight (it replaces the start "
                            f"state)")
    with torch.no_grad():
        for a, w in read:
            if a.state is not None:
                model.initial_state = a.state.to(model.emb.weight.device, torch.float32).clone()
                continue
            for key, t in a.full.items():
                p = model.get_parameter(key)
                new = p.float() + w * (t.to(p.device) - p.float())
                p.copy_(new.to(p.dtype))
            for module, (A, B) in a.lora.items():
                parent_name, _, child = module.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                lin = getattr(parent, child)
                if not isinstance(lin, nn.Linear):
                    raise FinetuneError(f"adapter {a.path}: {module} is not a linear layer")
                if not isinstance(lin, LoRALinear):
                    lin = LoRALinear(lin)
                    setattr(parent, child, lin)
                lin.add(A, B, w * a.scaling)
    model.adapters = getattr(model, "adapters", []) + [(str(a.path), w) for a, w in read]
    return model.eval()


def load_model(path: str | Path, adapters: Iterable = (), dtype: torch.dtype | str | None = None,
               device: str | torch.device = "cpu", force: bool = False, quant: str = "none") -> nn.Module:
    """Load a BlinkDL RWKV checkpoint with adapters plugged in unmerged (see `attach_adapters`), in eval mode.

    `adapters`: adapter directories or packed `.safetensors` files, or (path, weight) pairs. `quant` int8 / nf4
    holds the block projections quantized (see `finetune.quant`).
    """
    if quant != "none":
        model = load_quantized(path, dtype=dtype, quant=quant, device=device)
    else:
        model = checkpoint.load_model(path, dtype=dtype, device=device)
    return attach_adapters(model, adapters, force=force) if adapters else model
