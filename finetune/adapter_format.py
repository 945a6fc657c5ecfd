"""The adapter on disk: one description (`AdapterMeta`), one LoRA formula (`lora_delta`), reading and writing.

Nothing here needs peft or a model: merge, info, pack and the plug-in read adapters through this module; only
training (`finetune.adapters`) wraps a model with peft and hands its tensors to `write_adapter`.

An adapter directory (what training writes to OUT_DIR/final/ and OUT_DIR/step-N/, and import-lora writes):

    rwkv_lora.json               the AdapterMeta: format, version, kind, family, base (fingerprint, path and the
                                 family's dimensions), tokenizer, r, alpha, use_rslora, scaling, dropout, parts,
                                 train, trained_tensors, recipe
    adapter_config.json          a peft LoraConfig (r, lora_alpha, target_modules, ...): PeftModel.from_pretrained
    adapter_model.safetensors    the LoRA factors under peft's keys (base_model.model.blocks.N.att.key.lora_A.weight
                                 [r, in], ...lora_B.weight [out, r]), float32
    trained_tensors.safetensors  the tensors trained in full under their checkpoint names; absent when none were
    tokenizer.json               the tokenizer, when it is a tokenizer.json (recorded as "tokenizer.json sha256:<hex>")

A state adapter (kind "state", from `train_type: state`) holds rwkv_lora.json, `state.safetensors` (the learned
start state, float32, unbatched: `att_shift` [L, C], `wkv` [L, ...] (the family's WKV state), `ffn_shift` [L, C])
and the tokenizer.

A packed adapter is one safetensors file: tensors `lora.<module>.A`, `lora.<module>.B`, `full.<checkpoint name>` or
`state.att_shift`, `state.wkv`, `state.ffn_shift`; header metadata `format` = rwkv-lora-adapter, `packed` = "1", `rwkv_lora` = the rwkv_lora.json document,
each of its fields as a JSON string under its own name (for tools that read headers), and `tokenizer.json` = the
tokenizer file's text when the adapter carries one.

Every adapter is checked when read and before it is written (`validate`): the scaling must be what r, alpha and
use_rslora give, ranks must equal r, and every value must be finite.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from finetune.atomic import atomic_dir, atomic_file, check_output
from finetune.checkpoint import all_finite
from finetune.errors import FinetuneError, first_line
from finetune.models import Family, RNNState, get_family
from finetune.tensorfiles import save_safetensors
from finetune.tokenizer import Tokenizer, load_tokenizer

ADAPTER_META = "rwkv_lora.json"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
TRAINED_TENSORS = "trained_tensors.safetensors"
STATE_TENSORS = "state.safetensors"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_HASH = "tokenizer.json sha256:"  # + the file's sha256: how an adapter records a tokenizer.json
FORMAT = "rwkv-lora-adapter"
FORMAT_VERSION = 1
KINDS = ("lora", "state")
LEGACY_FAMILY = "rwkv4"  # adapters written before they recorded a family were all RWKV-4


# ----------------------------------------------------------------------------------------------------------------------
# The LoRA formula


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """What multiplies B @ A: alpha / r, or alpha / sqrt(r) with rank-stabilised LoRA (peft's convention)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def lora_delta(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """The weight change of one adapted matrix: scaling * B @ A ([out, in], float32), with A [r, in] and B [out, r].
    Merging adds it to W (`add_lora_delta_`); the plug-in applies it factored (`lora_factors`)."""
    return scaling * (B.float() @ A.float())


def add_lora_delta_(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """W += lora_delta(A, B, scaling), in place and without the [out, in] temporary (float32 W)."""
    if abs(scaling) > torch.finfo(W.dtype).max:  # addmm_ refuses such an alpha: let it overflow to inf in W,
        return W.add_(lora_delta(A, B, scaling))  # where the callers' finiteness check names the tensor
    return W.addmm_(B.float(), A.float(), alpha=scaling)


def lora_factors(A: torch.Tensor, B: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') with B' @ A' == lora_delta(A, B, scaling): x A'^T B'^T is the delta applied to x without forming it."""
    return A.float(), B.float() * scaling


def blend_full_(W: torch.Tensor, T: torch.Tensor, weight: float) -> torch.Tensor:
    """W += weight * (T - W) in place (float32 W): a tensor trained in full, applied with a weight (1 replaces W)."""
    if abs(weight) > torch.finfo(W.dtype).max:  # as in add_lora_delta_
        return W.add_((T.to(W.device, W.dtype) - W) * weight)
    return W.add_(T.to(W.device, W.dtype) - W, alpha=weight)


# ----------------------------------------------------------------------------------------------------------------------
# The description


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _str_list(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(v, str) for v in x)


@dataclass
class AdapterMeta:
    """What an adapter says about itself (rwkv_lora.json). `scaling` is derived from r, alpha and use_rslora; it is
    written for readers and, when read back, must agree with them."""

    kind: str = "lora"
    """"lora" (LoRA factors and tensors trained in full) or "state" (a learned start state)."""
    family: str = LEGACY_FAMILY
    """The model family it was made for ("rwkv4", ...): plugging it into another family is refused."""
    base: dict[str, Any] = field(default_factory=dict)
    """The base model: fingerprint (`finetune.checkpoint.fingerprint`), path, and the family's dimensions."""
    tokenizer: str | None = None
    """"world", "tokenizer.json sha256:<hex>" (the file travels with the adapter), or None when unknown."""
    template: str | None = None
    """The chat template its training data was prepared with (`rwkv-lora prepare --template`: raven, world, ...);
    chat and the server talk to it in that format. None when unknown (then: by tokenizer)."""
    r: int | None = None
    alpha: float | None = None
    use_rslora: bool = False
    dropout: float | None = None
    parts: list[str] = field(default_factory=list)
    """LoRA targets by part, as the family names them (att, ffn)."""
    train: list[str] = field(default_factory=list)
    """Groups of tensors trained in full (time, ln, emb, head)."""
    trained_tensors: list[str] = field(default_factory=list)
    state_shapes: dict[str, list[int]] | None = None
    """kind "state": the shape of each of the start state's tensors (att_shift, wkv, ffn_shift)."""
    recipe: dict[str, Any] = field(default_factory=dict)
    """The training settings (or where an imported adapter came from)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Fields this version does not know, kept so that re-writing an adapter loses nothing."""
    format: str = FORMAT
    version: int = FORMAT_VERSION

    @property
    def scaling(self) -> float:
        if self.r is None or self.alpha is None:
            raise FinetuneError("a state adapter has no LoRA scaling")
        return lora_scaling(self.r, self.alpha, self.use_rslora)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: Any = "<adapter>") -> "AdapterMeta":
        """Parse and check rwkv_lora.json (or the dict a trainer assembles): types, the format, and a recorded
        scaling against r / alpha / use_rslora. One-line FinetuneError naming `where`."""
        if not isinstance(d, Mapping):
            raise FinetuneError(f"{where}: adapter metadata is not a JSON object")
        d = dict(d)
        fmt = d.pop("format", FORMAT)
        if fmt != FORMAT:
            raise FinetuneError(f"{where}: not an rwkv-lora adapter (format {fmt!r})")
        recorded_scaling = d.pop("scaling", None)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "format"}
        known = {k: v for k, v in d.items() if k in names}
        meta = cls(**known, extra={k: v for k, v in d.items() if k not in names})
        # null is "not recorded" for these (older files); any other value is type-checked by check()
        meta.family = meta.family or LEGACY_FAMILY
        meta.base = {} if meta.base is None else meta.base
        meta.recipe = {} if meta.recipe is None else meta.recipe
        meta.parts, meta.train, meta.trained_tensors = (
            [] if x is None else list(x) if isinstance(x, tuple) else x
            for x in (meta.parts, meta.train, meta.trained_tensors))
        if meta.use_rslora is None:
            meta.use_rslora = False
        meta.check(where)
        if meta.kind == "lora" and recorded_scaling is not None:
            # the scaling is recorded for readers; a damaged or edited file whose scaling contradicts its own r and
            # alpha is refused rather than merged with a made-up strength
            expected = meta.scaling
            if not _is_number(recorded_scaling) or not math.isfinite(recorded_scaling) or \
                    not math.isclose(recorded_scaling, expected, rel_tol=1e-6):
                raise FinetuneError(f"{where}: scaling {recorded_scaling!r} contradicts r={meta.r}, "
                                    f"alpha={meta.alpha:g}{' (rsLoRA)' if meta.use_rslora else ''}, which give "
                                    f"{expected:g}; the adapter is damaged or was edited")
        return meta

    def check(self, where: Any = "<adapter>") -> None:
        """Every field's type (adapters come from strangers: a wrong type is a one-line refusal here, not a
        TypeError wherever the field is first used), then the LoRA settings' ranges."""
        if not isinstance(self.kind, str) or self.kind not in KINDS:
            raise FinetuneError(f"{where}: unknown adapter kind {self.kind!r} ({' or '.join(KINDS)})")
        if not isinstance(self.version, int) or isinstance(self.version, bool) or self.version > FORMAT_VERSION:
            raise FinetuneError(f"{where}: adapter format version {self.version!r}; this rwkv-lora reads up to "
                                f"{FORMAT_VERSION} (upgrade rwkv-lora)")
        for name, ok, what in (
                ("family", isinstance(self.family, str), "a string"),
                ("tokenizer", self.tokenizer is None or isinstance(self.tokenizer, str), "a string or null"),
                ("template", self.template is None or isinstance(self.template, str), "a string or null"),
                ("base", isinstance(self.base, dict), "a JSON object"),
                ("recipe", isinstance(self.recipe, dict), "a JSON object"),
                ("parts", _str_list(self.parts), "a list of strings"),
                ("train", _str_list(self.train), "a list of strings"),
                ("trained_tensors", _str_list(self.trained_tensors), "a list of strings"),
                ("dropout", self.dropout is None or _is_number(self.dropout), "a number or null"),
                ("state_shapes", self.state_shapes is None or (
                    isinstance(self.state_shapes, dict) and all(
                        isinstance(v, list) and all(isinstance(n, int) and not isinstance(n, bool) for n in v)
                        for v in self.state_shapes.values())), "a JSON object of integer lists")):
            if not ok:
                value = repr(getattr(self, name))
                raise FinetuneError(f"{where}: adapter metadata field {name!r} must be {what}, got "
                                    f"{value[:60]}{'...' if len(value) > 60 else ''}")
        if self.kind == "lora":
            if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
                raise FinetuneError(f"{where}: r must be a positive integer, got {self.r!r}")
            if not _is_number(self.alpha) or not 0 < self.alpha <= torch.finfo(torch.float32).max:
                raise FinetuneError(f"{where}: alpha must be a positive number within float32's range, got "
                                    f"{self.alpha!r}")
            if not isinstance(self.use_rslora, bool):
                raise FinetuneError(f"{where}: use_rslora must be true or false, got {self.use_rslora!r}")
        if not isinstance(self.base, dict):
            raise FinetuneError(f"{where}: base must be a JSON object")

    def to_dict(self) -> dict[str, Any]:
        """rwkv_lora.json's content: LoRA fields only for LoRA adapters, the state's shape only for state ones."""
        d: dict[str, Any] = {"format": self.format, "version": self.version, "kind": self.kind,
                             "family": self.family, "base": self.base, "tokenizer": self.tokenizer}
        if self.template is not None:
            d["template"] = self.template
        if self.kind == "lora":
            d.update(r=self.r, alpha=self.alpha, use_rslora=self.use_rslora, scaling=self.scaling,
                     dropout=self.dropout, parts=self.parts, train=self.train,
                     trained_tensors=self.trained_tensors)
        else:
            d["state_shapes"] = self.state_shapes
        d["recipe"] = self.recipe
        d.update(self.extra)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str) + "\n"


def as_meta(meta: AdapterMeta | Mapping[str, Any], where: Any = "<adapter>") -> AdapterMeta:
    """An AdapterMeta from itself or from the dict a trainer assembles (checked the same way)."""
    return dataclasses.replace(meta) if isinstance(meta, AdapterMeta) else AdapterMeta.from_dict(meta, where)


# ----------------------------------------------------------------------------------------------------------------------
# An adapter in memory


@dataclass
class Adapter:
    """An adapter as read from disk: everything merging and plug-in need."""

    path: Path
    meta: AdapterMeta
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """module name (blocks.N.att.key) -> (A [r, in], B [out, r]), float32."""
    full: dict[str, torch.Tensor] = field(default_factory=dict)
    """checkpoint name -> tensor trained in full (replaces the base tensor), float32."""
    state: RNNState | None = None
    """kind "state": the learned start state (unbatched, [L, ...] per field), float32."""
    tokenizer_json: bytes | None = None
    """The tokenizer.json the adapter carries (its record is then "tokenizer.json sha256:<hex>")."""

    @property
    def kind(self) -> str:
        return self.meta.kind

    @property
    def scaling(self) -> float:
        return self.meta.scaling

    def delta(self, module: str) -> torch.Tensor:
        """lora_delta for one adapted module."""
        A, B = self.lora[module]
        return lora_delta(A, B, self.scaling)


def validate(a: Adapter) -> Adapter:
    """Refuse an adapter that disagrees with itself or holds non-finite values (its metadata was checked when
    parsed): ranks equal to r, a tokenizer file matching its record, no NaN or infinity anywhere."""
    where = a.path
    a.meta.check(where)
    if a.kind == "lora":
        if not a.lora and not a.full:
            raise FinetuneError(f"{where}: no LoRA tensors found")
        for module, (A, _) in a.lora.items():
            if A.shape[0] != a.meta.r:
                raise FinetuneError(f"{where}: {module} has rank {A.shape[0]} but the adapter says r={a.meta.r}")
        # what the metadata lists must all be there: a lost file would otherwise merge half an adapter, silently
        listed = set(a.meta.trained_tensors)
        lost, unlisted = sorted(listed - set(a.full)), sorted(set(a.full) - listed)
        if lost:
            raise FinetuneError(f"{where}: lists {len(listed)} tensors trained in full but holds no {lost[0]}"
                                f"{f' (nor {len(lost) - 1} more)' if len(lost) > 1 else ''}; is a file of it lost?")
        if listed and unlisted:
            raise FinetuneError(f"{where}: holds {unlisted[0]}, which its metadata does not list as trained")
        with_lora = {m.split(".")[2] for m in a.lora if m.startswith("blocks.") and m.count(".") >= 3}
        bare = [p for p in a.meta.parts if p not in with_lora]
        if bare:
            raise FinetuneError(f"{where}: records LoRA on {', '.join(a.meta.parts)} but holds no LoRA tensors for "
                                f"{', '.join(bare)}; is a file of it lost?")
    elif a.state is None:
        raise FinetuneError(f"{where}: a state adapter without its state")
    _check_tokenizer(a.meta, a.tokenizer_json, where)
    tensors = [(f"{m}.lora_A", A) for m, (A, _) in a.lora.items()] + \
              [(f"{m}.lora_B", B) for m, (_, B) in a.lora.items()] + list(a.full.items())
    if a.state is not None:
        tensors += [(f"state.{k}", v) for k, v in a.state.tensors().items()]
    for name, t in tensors:
        if not all_finite(t):
            raise FinetuneError(f"{where}: {name} holds NaN or infinite values; the adapter is damaged (was its "
                                f"training diverging?)")
    return a


def as_float(t: torch.Tensor, name: str, where: Any) -> torch.Tensor:
    """An adapter's tensor as float32; one line for integer, bool or complex tensors, which no training writes
    (converting them would truncate or drop values silently)."""
    if not t.is_floating_point():
        raise FinetuneError(f"{where}: {name} is {str(t.dtype).replace('torch.', '')}; adapter tensors are floating "
                            f"point (fp32, fp16, bf16)")
    return t.float()


def check_pairs(lora: dict[str, list], where: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    pairs = {}
    for module, (A, B) in lora.items():
        if A is None or B is None:
            raise FinetuneError(f"{where}: {module} has only one of lora_A / lora_B")
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise FinetuneError(f"{where}: rank mismatch for {module}: A is {tuple(A.shape)}, B is {tuple(B.shape)}")
        pairs[module] = (A, B)
    return pairs


def _check_state(tensors: Mapping[str, torch.Tensor], where: Any) -> RNNState:
    """The unbatched RNNState from its three named tensors; one line if any is missing or misshapen (finiteness is
    checked by `validate`)."""
    missing = [f for f in RNNState.FIELDS if f not in tensors]
    if missing or set(tensors) - set(RNNState.FIELDS):
        raise FinetuneError(f"{where}: a state adapter holds exactly the tensors {', '.join(RNNState.FIELDS)}; got "
                            f"{', '.join(sorted(tensors)) or 'none'}")
    state = RNNState(*(as_float(tensors[f], f, where) for f in RNNState.FIELDS))
    L = state.att_shift.shape[0]
    if state.att_shift.dim() != 2 or state.ffn_shift.shape != state.att_shift.shape or state.wkv.shape[0] != L:
        raise FinetuneError(f"{where}: inconsistent state shapes {[tuple(t.shape) for t in state.tensors().values()]}")
    return state


def peft_lora_key(key: str) -> tuple[str, int] | None:
    """A peft LoRA weight name -> (module, 0 for A / 1 for B): base_model.model.blocks.0.att.key.lora_A.weight ->
    ("blocks.0.att.key", 0); None for anything else."""
    name = key.removeprefix("base_model.model.")
    for which, idx in ((".lora_A.", 0), (".lora_B.", 1)):
        if which in name:
            return name.split(which)[0], idx
    return None


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizers travel with adapters


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


def _check_tokenizer(meta: AdapterMeta, data: bytes | None, where: Any) -> None:
    if data is None:
        return
    record = meta.tokenizer
    if not (isinstance(record, str) and record.startswith(TOKENIZER_HASH)):
        raise FinetuneError(f"{where}: carries a tokenizer.json but records tokenizer {record!r}")
    if hashlib.sha256(data).hexdigest() != record[len(TOKENIZER_HASH):]:
        raise FinetuneError(f"{where}: its tokenizer.json does not match the sha256 the adapter records; the adapter "
                            f"is damaged or was edited")


def adapter_tokenizer_json(a: Adapter) -> str | None:
    """The text of the tokenizer.json an adapter was trained with: the one it carries, or (adapters from before
    tokenizers travelled with them) the file its record names when that exists here. None for World and when
    unknown."""
    if a.tokenizer_json is not None:
        return a.tokenizer_json.decode("utf-8")
    record = a.meta.tokenizer
    if isinstance(record, str) and record.endswith(".json") and Path(record).is_file():
        return Path(record).read_text(encoding="utf-8")
    return None


def adapter_tokenizer(a: Adapter) -> Tokenizer | None:
    """The adapter's tokenizer, or None when it records none. One-line FinetuneError when it records one that it
    does not carry and that is not here either."""
    record = a.meta.tokenizer
    if record is None:
        return None
    if str(record).startswith("world"):
        return load_tokenizer("world")
    if a.tokenizer_json is not None and a.path.is_dir():
        return load_tokenizer(str(a.path / TOKENIZER_FILE))
    text = adapter_tokenizer_json(a)
    if text is None:
        raise FinetuneError(f"adapter {a.path}: records tokenizer {record!r} but does not carry it and no such file "
                            f"is here; pass --tokenizer")
    with tempfile.TemporaryDirectory() as tmp:  # a packed adapter: the tokenizer is read once, from a private copy
        path = Path(tmp) / TOKENIZER_FILE
        path.write_text(text, encoding="utf-8")
        return load_tokenizer(str(path))


# ----------------------------------------------------------------------------------------------------------------------
# Reading


def adapter_files(path: str | Path) -> list[Path]:
    """The adapter itself and every file it is made of: what a command reading it must never write over."""
    path = Path(path)
    if path.is_dir():
        return [path, *sorted(p for p in path.iterdir() if p.is_file())]
    return [path]


def is_adapter(path: str | Path) -> bool:
    """An adapter directory or a packed adapter file."""
    path = Path(path)
    return (path / ADAPTER_META).is_file() or is_packed(path)


def read_adapter(path: str | Path) -> Adapter:
    """Read and check an adapter directory or packed file (safetensors only; nothing is unpickled). One-line
    FinetuneError on any problem."""
    path = Path(path)
    if not path.exists():
        raise FinetuneError(f"{path}: no such adapter")
    return validate(_read_packed(path) if path.is_file() else _read_dir(path))


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own exception types
        raise FinetuneError(f"{path}: corrupted or truncated ({first_line(e)})") from None


def _read_dir(path: Path) -> Adapter:
    if not (path / ADAPTER_META).is_file():
        raise FinetuneError(f"{path}: not an rwkv-lora adapter (no {ADAPTER_META})")
    try:
        raw = json.loads((path / ADAPTER_META).read_text())
    except (OSError, ValueError) as e:
        raise FinetuneError(f"{path / ADAPTER_META}: unreadable adapter metadata ({first_line(e)})") from None
    meta = AdapterMeta.from_dict(raw, path / ADAPTER_META)
    tokenizer_json = None
    if (path / TOKENIZER_FILE).is_file():
        try:
            tokenizer_json = (path / TOKENIZER_FILE).read_bytes()
        except OSError as e:
            raise FinetuneError(f"{path / TOKENIZER_FILE}: unreadable ({e.strerror})") from None
    if meta.kind == "state":
        if not (path / STATE_TENSORS).is_file():
            raise FinetuneError(f"{path / STATE_TENSORS}: missing (a state adapter keeps its start state there)")
        state = _load_safetensors(path / STATE_TENSORS)
        return Adapter(path=path, meta=meta, state=_check_state(state, path / STATE_TENSORS),
                       tokenizer_json=tokenizer_json)
    lora: dict[str, list] = {}
    weights = path / PEFT_WEIGHTS
    if weights.exists():
        for key, t in _load_safetensors(weights).items():
            which = peft_lora_key(key)
            if which is None:
                raise FinetuneError(f"{weights}: unexpected tensor {key}")
            lora.setdefault(which[0], [None, None])[which[1]] = as_float(t, key, weights)
    pairs = check_pairs(lora, weights)
    full = {}
    if (path / TRAINED_TENSORS).exists():
        full = {k: as_float(v, k, path / TRAINED_TENSORS) for k, v in _load_safetensors(path / TRAINED_TENSORS).items()}
    if not pairs and not full:
        # applying nothing and reporting success would be a silent wrong result
        if (path / "adapter_model.bin").exists():
            raise FinetuneError(f"{path}: no LoRA tensors found (adapter_model.bin is a pickle and is never loaded; "
                                f"save the adapter with safetensors)")
        raise FinetuneError(f"{path}: no LoRA tensors found (no {PEFT_WEIGHTS} or {TRAINED_TENSORS})")
    return Adapter(path=path, meta=meta, lora=pairs, full=full, tokenizer_json=tokenizer_json)


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
    md = header.get("__metadata__") if header else None
    return isinstance(md, dict) and md.get("format") == FORMAT


def _read_packed(path: Path) -> Adapter:
    header = _safetensors_header(path)
    if header is None:
        raise FinetuneError(f"{path}: not an rwkv-lora adapter (not a safetensors file, or truncated)")
    md = header.get("__metadata__") or {}
    if not isinstance(md, dict) or md.get("format") != FORMAT:
        raise FinetuneError(f"{path}: not an rwkv-lora adapter (a safetensors file without rwkv-lora metadata; "
                            f"is it a model checkpoint?)")
    try:
        raw = json.loads(md["rwkv_lora"])
    except (KeyError, TypeError, ValueError) as e:
        raise FinetuneError(f"{path}: unreadable adapter metadata ({first_line(e)})") from None
    if not isinstance(md.get(TOKENIZER_FILE, ""), str):
        raise FinetuneError(f"{path}: unreadable adapter metadata ({TOKENIZER_FILE} is not text)")
    meta = AdapterMeta.from_dict(raw, path)
    lora: dict[str, list] = {}
    full: dict[str, torch.Tensor] = {}
    state: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                t = as_float(f.get_tensor(key), key, path)
                if key.startswith("state.") and meta.kind == "state":
                    state[key[6:]] = t
                elif key.startswith("full."):
                    full[key[5:]] = t
                elif key.startswith("lora.") and key.endswith((".A", ".B")):
                    lora.setdefault(key[5:-2], [None, None])[0 if key.endswith(".A") else 1] = t
                else:
                    raise FinetuneError(f"{path}: unexpected tensor {key}")
    except FinetuneError:
        raise
    except Exception as e:  # safetensors raises its own exception types
        raise FinetuneError(f"{path}: corrupted or truncated adapter file ({first_line(e)})") from None
    tokenizer_json = md[TOKENIZER_FILE].encode("utf-8") if TOKENIZER_FILE in md else None
    if meta.kind == "state":
        return Adapter(path=path, meta=meta, state=_check_state(state, path), tokenizer_json=tokenizer_json)
    if not lora and not full:
        raise FinetuneError(f"{path}: no LoRA tensors found in the packed adapter")
    return Adapter(path=path, meta=meta, lora=check_pairs(lora, path), full=full, tokenizer_json=tokenizer_json)


def describe_adapter(path: str | Path) -> str:
    """What `rwkv-lora info` prints for an adapter."""
    a = read_adapter(path)
    m = a.meta
    base = m.base
    where = "packed file" if Path(path).is_file() else "directory"
    lines = [f"file:        {path}"]
    if a.kind == "state":
        n_layer, C = a.state.att_shift.shape
        numbers = sum(t.numel() for t in a.state.tensors().values())
        wkv = " x ".join(str(d) for d in a.state.wkv.shape[1:])
        lines += [f"kind:        state adapter (rwkv-lora format {m.version}, {where}): a learned start state",
                  f"state:       {n_layer} layers: token shifts of {C}, WKV {wkv} ({numbers:,} numbers)"]
    else:
        lines += [f"kind:        {m.kind} adapter (rwkv-lora format {m.version}, {where})",
                  f"rank:        {m.r}   alpha: {m.alpha:g}   scaling: {m.scaling:.4g}"
                  + ("   (rsLoRA)" if m.use_rslora else ""),
                  f"parts:       {', '.join(m.parts) or '-'}   trained in full: {', '.join(m.train) or '-'}",
                  f"modules:     {len(a.lora)} LoRA pairs, {len(a.full)} full tensors"]
    lines += [f"family:      {m.family}",
              f"base:        {base.get('n_layer')} x {base.get('n_embd')}, vocab {base.get('vocab_size')}, "
              f"fingerprint {base.get('fingerprint')}",
              f"tokenizer:   {m.tokenizer}" + ("   (carried)" if a.tokenizer_json is not None else "")]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# Writing


def peft_config(meta: AdapterMeta, modules: list[str]) -> dict[str, Any]:
    """adapter_config.json as peft writes it for our LoRA (the keys `LoraConfig` needs; the rest take peft's
    defaults), so that `PeftModel.from_pretrained` loads the directory."""
    return {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
            "r": meta.r, "lora_alpha": meta.alpha, "lora_dropout": meta.dropout or 0.0, "use_rslora": meta.use_rslora,
            "bias": "none", "target_modules": modules, "fan_in_fan_out": False, "init_lora_weights": True,
            "modules_to_save": None}


def _with_tokenizer(meta: AdapterMeta, tokenizer_json: bytes | None) -> tuple[AdapterMeta, bytes | None]:
    """A tokenizer setting given as a tokenizer.json path becomes its hash record plus the file to carry."""
    if tokenizer_json is None:
        meta.tokenizer, tokenizer_json = tokenizer_record(meta.tokenizer)
    return meta, tokenizer_json


def write_adapter(out_dir: str | Path, meta: AdapterMeta | Mapping[str, Any],
                  lora: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                  full: Mapping[str, torch.Tensor] | None = None, state: RNNState | None = None,
                  tokenizer_json: bytes | None = None) -> Path:
    """Write an adapter directory atomically (a temporary directory renamed into place; an existing one is
    replaced: callers check the output first). Everything is validated before anything is written: nothing
    non-finite or inconsistent is ever saved. A tokenizer.json path in `meta.tokenizer` is recorded by its hash
    and copied in; `tokenizer_json` is the content of the file `meta.tokenizer` already records by hash."""
    out_dir = Path(out_dir)
    meta, tokenizer_json = _with_tokenizer(as_meta(meta, out_dir), tokenizer_json)
    lora = {m: (A.detach().float().cpu().contiguous(), B.detach().float().cpu().contiguous())
            for m, (A, B) in sorted((lora or {}).items())}
    full = {k: v.detach().float().cpu().contiguous() for k, v in sorted((full or {}).items())}
    if meta.kind == "state":
        if state is None:
            raise FinetuneError(f"{out_dir}: a state adapter needs its state")
        state = state.map(lambda t: t.detach().float().cpu().contiguous())
        meta.state_shapes = {k: list(v.shape) for k, v in state.tensors().items()}
    else:
        meta.trained_tensors = sorted(full)
    a = validate(Adapter(path=out_dir, meta=meta, lora=lora, full=full, state=state,
                         tokenizer_json=tokenizer_json))
    with atomic_dir(out_dir) as tmp:
        if a.state is not None:
            save_safetensors(a.state.tensors(), tmp / STATE_TENSORS)
        if lora:
            (tmp / PEFT_CONFIG).write_text(json.dumps(peft_config(meta, sorted(lora)), indent=2) + "\n")
            tensors = {}
            for module, (A, B) in lora.items():
                tensors[f"base_model.model.{module}.lora_A.weight"] = A
                tensors[f"base_model.model.{module}.lora_B.weight"] = B
            save_safetensors(tensors, tmp / PEFT_WEIGHTS, metadata={"format": "pt"})
        if full:
            save_safetensors(full, tmp / TRAINED_TENSORS)
        if tokenizer_json is not None:
            (tmp / TOKENIZER_FILE).write_bytes(tokenizer_json)
        (tmp / ADAPTER_META).write_text(meta.to_json())
    return out_dir


def save_state_adapter(state: RNNState, out_dir: str | Path, meta: AdapterMeta | Mapping[str, Any]) -> Path:
    """Write a state adapter directory (state.safetensors + rwkv_lora.json), atomically. `state` is unbatched."""
    meta = as_meta({**(meta.to_dict() if isinstance(meta, AdapterMeta) else meta), "kind": "state"}, out_dir)
    return write_adapter(out_dir, meta, state=state)


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
    document = a.meta.to_dict()
    header = {k: json.dumps(v, default=str) for k, v in document.items() if k != "format"}
    header.update(format=FORMAT, packed="1", rwkv_lora=json.dumps(document, default=str))
    if a.tokenizer_json is not None:
        header[TOKENIZER_FILE] = a.tokenizer_json.decode("utf-8")  # the tokenizer travels in the header
    with atomic_file(out) as tmp:
        save_safetensors(tensors, tmp, metadata=header)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Using adapters: which, with what weight, on which base


def parse_adapter_spec(spec: Any) -> tuple[str | Adapter, float]:
    """`DIR`, `DIR:0.5`, `(DIR, 0.5)` or an Adapter -> (path or Adapter, weight). The weight must be finite."""
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
            weight = float(tail)
        except ValueError:
            if head and Path(head).exists():  # an adapter, then something that is not a weight
                raise FinetuneError(f"adapter {spec}: the weight after ':' must be a number, got {tail!r}") from None
            return text, 1.0
        if not head:
            raise FinetuneError(f"adapter {spec}: no adapter path before the weight")
        return head, _finite_weight(weight, spec)
    return text, 1.0


def _finite_weight(w: float, spec: Any) -> float:
    if not math.isfinite(w):
        raise FinetuneError(f"adapter {spec}: the weight must be a finite number, got {w}")
    return w


def check_adapter(adapter: Adapter, shapes: Mapping[str, tuple[int, ...]], base_fingerprint: str | None,
                  family: Family | str | None = None, force: bool = False,
                  base_name: str = "the base model",
                  state_shapes: Mapping[str, tuple[int, ...]] | None = None) -> None:
    """Refuse (one-line FinetuneError naming the adapter) an adapter of another model family, one whose target keys
    or shapes are not in the base, and (unless force=True: then only family and shapes must fit) one whose
    recorded base fingerprint differs or is missing."""
    name = adapter.path
    if family is not None:
        family = get_family(family) if isinstance(family, str) else family
        if adapter.meta.family != family.name:
            raise FinetuneError(f"adapter {name} was made for a {adapter.meta.family} model; {base_name} is "
                                f"{family.title} ({family.name})")
    for module, (A, B) in adapter.lora.items():
        key = f"{module}.weight"
        if module == "emb":  # the one 2-D weight that is not a linear layer: plugging it in would fail, merging not
            raise FinetuneError(f"adapter {name}: LoRA on emb, which is an embedding, not a linear layer (train it "
                                f"in full instead)")
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
    recorded = adapter.meta.base.get("fingerprint")
    if not recorded and not force:
        raise FinetuneError(f"adapter {name} does not record which base it was made for (no base fingerprint); "
                            f"pass --force (force=True) to apply it to {base_name} anyway")
    if recorded and base_fingerprint and recorded != base_fingerprint and not force:
        raise FinetuneError(f"adapter {name} was made for another base (fingerprint {recorded}, {base_name} has "
                            f"{base_fingerprint}); pass --force (force=True) to apply it anyway")


def read_adapters(specs: Iterable[Any]) -> list[tuple[Adapter, float]]:
    """Adapters and their weights from specs (see `parse_adapter_spec`)."""
    out = []
    for spec in specs:
        a, w = parse_adapter_spec(spec)
        out.append((a if isinstance(a, Adapter) else read_adapter(a), w))
    return out
