"""BlinkDL RWKV checkpoint files: read safely, recognise the generation, check, build the model, fingerprint, write.

Files are flat state dicts in RWKV-LM's raw layout (see RWKV4-FACTS: raw `time_decay`, `time_mix_*` of shape
[1, 1, C], `blocks.0.ln0`). They are read with `torch.load(weights_only=True)` (never unpickling code) or with
safetensors, and written back in the same layout: never after an inference loader's rewrites.
"""

from __future__ import annotations

import dataclasses
import hashlib
import warnings
from pathlib import Path
from typing import Any, Callable, Container, Mapping

import torch
from safetensors import safe_open

from finetune import pages
from finetune.atomic import atomic_file
from finetune.errors import FinetuneError, first_line
from finetune.models import Family, detect, parse_dtype
from finetune.models.family import tall_weights_column_major_
from finetune.tensorfiles import archive_name, save_pth, save_safetensors

# what a checkpoint's tensors may be: quantized or integer files cannot be trained, merged or run here
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a {name: tensor} dict (CPU). Any problem is a one-line FinetuneError."""
    path = Path(path)
    if path.is_dir():  # say what is wrong: "no such file" sends the user looking for a typo in the name
        raise FinetuneError(f"{path}: is a directory, not a checkpoint file")
    if not path.is_file():
        raise FinetuneError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        try:
            # tensor by tensor from safetensors' memory map (torch owns the mapping): nothing is read until used
            with safe_open(str(path), framework="pt") as f:
                sd = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise FinetuneError(f"{path}: cannot read safetensors file ({first_line(e)})") from None
    else:
        try:
            with warnings.catch_warnings():  # torch's note on a legacy pickle's protocol: the error line says it all
                warnings.filterwarnings("ignore", message=".*pickle protocol.*")
                sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=_zipfile(path))
        except Exception as e:
            reason = first_line(e)
            if "weights_only" in str(e) or "Unsupported global" in str(e):
                reason = "it holds Python objects other than tensors, which are never unpickled here"
            raise FinetuneError(f"{path}: cannot read checkpoint ({reason}); is it truncated or not a "
                                f"PyTorch checkpoint?") from None
    # a few trainers wrap the state dict; unwrap the obvious cases
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and len(sd) == 1 and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise FinetuneError(f"{path}: not a state dict of tensors")
    for k, v in sd.items():  # what torch.load accepts but no checkpoint of ours can hold
        if not isinstance(k, str):
            raise FinetuneError(f"{path}: not a state dict of tensors (a key is {type(k).__name__} {k!r}, not a name)")
        if v.layout != torch.strided or v.device.type != "cpu":
            raise FinetuneError(f"{path}: {k} is a {str(v.layout).replace('torch.', '')} tensor on {v.device}; "
                                f"a checkpoint holds dense tensors with their values")
    return sd


def _zipfile(path: Path) -> bool:
    """mmap only works on the zip format (torch >= 1.6); memory-mapping keeps big checkpoints cheap to open."""
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def all_finite(t: torch.Tensor) -> bool:
    """No NaN and no infinity in a float tensor (non-float tensors are finite)."""
    if t.numel() == 0 or not (t.is_floating_point() or t.is_complex()):
        return True
    lo, hi = torch.aminmax(t)  # one pass and no tensor-sized temporary; NaN propagates, an infinity is an extreme
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


# the tensors whose values a fingerprint reads (those a checkpoint lacks are skipped): a streaming reader loads only
# these to fingerprint a base
FINGERPRINT_PROBES = ("emb.weight", "blocks.0.att.time_decay", "blocks.0.att.key.weight", "ln_out.weight",
                      "head.weight")


def fingerprint(sd: Mapping[str, torch.Tensor]) -> str:
    """A short id of a base model: its shapes and a few of its values (rounded to bf16, so the same base stored in
    fp32 or bf16 has the same fingerprint). Adapters record it; merge and plug-in refuse a different base. Only the
    shapes of tensors other than `FINGERPRINT_PROBES` are read."""
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(f"{k}:{tuple(sd[k].shape)};".encode())
    for k in FINGERPRINT_PROBES:
        if k in sd:
            t = sd[k].detach().reshape(-1)[:4096].float().to(torch.bfloat16).view(torch.int16)
            h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def base_record(config: Any, base_fingerprint: str, path: str | Path) -> dict[str, Any]:
    """What an adapter records about its base: the fingerprint, the family config's dimensions and the path."""
    return {"fingerprint": base_fingerprint, **dataclasses.asdict(config), "path": str(path)}


def model_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's tensors under their checkpoint names, cast back to the dtypes they were loaded with."""
    dtypes = getattr(model, "checkpoint_dtypes", {})
    return {k: (v.to(dtypes[k]) if k in dtypes else v).detach().cpu().contiguous()
            for k, v in model.state_dict().items()}


def save_checkpoint(model_or_state_dict, path: str | Path) -> Path:
    """Write a BlinkDL-layout `.pth` (or `.safetensors` by suffix) atomically: a temp file renamed into place."""
    sd = model_or_state_dict if isinstance(model_or_state_dict, dict) else model_state_dict(model_or_state_dict)
    path = Path(path)
    with atomic_file(path) as tmp:
        if path.suffix == ".safetensors":
            save_safetensors(sd, tmp, metadata={"format": "pt"})
        else:
            save_pth(sd, tmp, archive=archive_name(path))
    return path


def describe_dtypes(sd: dict[str, torch.Tensor]) -> str:
    """'bf16' when all matrices share one dtype, else a count per dtype."""
    counts: dict[str, int] = {}
    for v in sd.values():
        name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(v.dtype, str(v.dtype))
        counts[name] = counts.get(name, 0) + v.numel()
    if len(counts) == 1:
        return next(iter(counts))
    total = sum(counts.values())
    return ", ".join(f"{k} {100 * n / total:.1f}%" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))


# ----------------------------------------------------------------------------------------------------------------------
# Building a model from a checkpoint


def check_keys(sd: dict[str, torch.Tensor], family: Family, config, path: str | Path = "<memory>") -> None:
    """Raise a one-line FinetuneError unless `sd` has exactly the family's keys with the right shapes."""
    expected = family.expected_shapes(config)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}")
        raise FinetuneError(f"{path}: not a complete {family.title} checkpoint ({'; '.join(parts)})")
    for k, shape in expected.items():
        if tuple(sd[k].shape) != shape:
            raise FinetuneError(f"{path}: {k} has shape {tuple(sd[k].shape)}, expected {shape}")
    for k, v in sd.items():
        if v.dtype not in FLOAT_DTYPES:
            raise FinetuneError(f"{path}: {k} is {str(v.dtype).replace('torch.', '')}; only float checkpoints "
                                f"(fp32, fp16, bf16) can be used (is it a quantized file? use the original)")


def first_non_finite(sd: Mapping[str, torch.Tensor], path: str | Path = "<memory>") -> str | None:
    """The name of the first tensor that holds NaN or an infinity, or None. Tensors memory-mapped from `path` are
    read in chunks whose pages are released as they go (`finetune.pages`): checking a checkpoint costs a chunk of
    memory, not the file."""
    mapped = pages.file_ranges(path)
    for k, v in sd.items():
        finite = True
        for rows in _row_chunks(v):
            finite = finite and all_finite(v[rows])
            pages.release(v[rows], mapped)
        if not finite:
            return k
    return None


def check_values(sd: dict[str, torch.Tensor], path: str | Path = "<memory>") -> None:
    """Raise a one-line FinetuneError naming the first tensor that holds NaN or an infinity (`first_non_finite`)."""
    k = first_non_finite(sd, path)
    if k is not None:
        raise FinetuneError(f"{path}: {k} holds NaN or infinite values; the checkpoint is damaged (a diverged "
                            f"training run?)")


def build_from_state_dict(state_dict: dict[str, torch.Tensor], path: str | Path = "<memory>",
                          dtype: torch.dtype | None = None,
                          convert: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
                          keep: Container[str] = (), keep_in_file: bool = False) -> torch.nn.Module:
    """The model of the checkpoint's family whose parameters are the checkpoint's tensors (built on the meta device:
    no random init). Keys and shapes are checked first.

    dtype None (and no `convert`): the tensors are used as they are (no copy; memory-mapped where the file was), the
    family's fp32 parameters cast to fp32. With `dtype`, every tensor but the family's fp32 parameters is converted
    to it one tensor at a time while the model is built, then `convert(name, tensor)` (e.g. quantization) is applied
    to it; pages of `path`'s memory map are released as they are copied, so the peak memory stays near the model as
    it will be held instead of file + model (a tensor that lives in that map reads back from the file if used again).
    Tensors named in `keep` are copied in the dtype they are stored in; with `keep_in_file` they are not copied at
    all where they lie whole in `path`'s memory map (contiguous): they stay in the file, to be read from it as needed
    and released again (`finetune.pages`; frozen tensors only: a write would be lost), and keep the file's row-major
    layout.
    """
    family = detect(state_dict, path)
    config = family.config_from_state_dict(state_dict, path)
    check_keys(state_dict, family, config, path)
    check_values(state_dict, path)
    with torch.device("meta"):
        model = family.model_class(config)
    model.checkpoint_dtypes = {k: v.dtype for k, v in state_dict.items()}
    # the base's identity as stored, before any cast: adapters made on this file must plug in whatever dtype the
    # user then asks for (fingerprinting the cast weights made `--dtype fp16` refuse them)
    model.base_fingerprint = fingerprint(state_dict)
    if dtype is None and convert is None:
        model.load_state_dict(state_dict, strict=True, assign=True)
        for name, p in model.named_parameters():  # decays always in fp32 (exact: bf16/fp16 -> fp32 loses nothing)
            if name.endswith(family.fp32_params) and p.dtype != torch.float32:
                p.data = p.data.float()
        return model
    mapped = pages.file_ranges(path)
    left = {}
    for name, src in state_dict.items():
        span = src.data_ptr(), src.data_ptr() + src.numel() * src.element_size()
        if keep_in_file and name in keep and not name.endswith(family.fp32_params) and src.is_contiguous() \
                and any(start <= span[0] and span[1] <= end for start, end in mapped):
            left[name] = src
            continue
        target = (torch.float32 if name.endswith(family.fp32_params) else
                  src.dtype if name in keep else (dtype or src.dtype))
        t = _copy_releasing(src, target, mapped)
        if convert is not None:
            t = convert(name, t)
        _assign(model, name, t)
    tall_weights_column_major_(model)  # the layout a load_state_dict gets from the model's post-hook
    for name, src in left.items():  # after: a column-major copy would take them out of the file
        _assign(model, name, src)
    return model


def _assign(model: torch.nn.Module, name: str, t: torch.Tensor) -> None:
    """Put `t` in the model as the parameter (or buffer) `name`, keeping its requires_grad flag."""
    prefix, _, leaf = name.rpartition(".")
    module = model.get_submodule(prefix)
    if leaf in module._parameters:
        module._parameters[leaf] = torch.nn.Parameter(t, requires_grad=module._parameters[leaf].requires_grad)
    else:
        module._buffers[leaf] = t


# Copying a checkpoint tensor drops the file pages it came from (`finetune.pages`): pages of a memory-mapped file
# count in the process's resident memory once touched; without this, loading an fp16 file into a bf16 model peaks at
# file + model.
_CHUNK_BYTES = 16 << 20  # copy (and release) big tensors 16 MiB at a time


def _copy_releasing(src: torch.Tensor, dtype: torch.dtype, mapped: list[tuple[int, int]]) -> torch.Tensor:
    """A new tensor (own memory) holding `src` in `dtype`, copied in row chunks whose file pages are released."""
    dst = torch.empty(src.shape, dtype=dtype)
    for rows in _row_chunks(src):
        dst[rows].copy_(src[rows])
        pages.release(src[rows], mapped)
    return dst


def _row_chunks(t: torch.Tensor) -> list[slice | tuple[()]]:
    """Indices that cut `t` into blocks of whole rows of about _CHUNK_BYTES (the whole tensor when it has no rows
    or is not contiguous: its pages are then not one range)."""
    if t.dim() == 0 or not t.is_contiguous():
        return [()]
    rows = max(1, _CHUNK_BYTES // max(1, t[0].numel() * t.element_size()))
    return [slice(i, i + rows) for i in range(0, t.shape[0], rows)]


def load_model(path: str | Path, dtype: torch.dtype | str | None = None,
               device: str | torch.device = "cpu") -> torch.nn.Module:
    """Load a BlinkDL RWKV checkpoint (`.pth` or `.safetensors`) of any supported generation, in eval mode.

    Every dimension comes from the tensors themselves. `dtype=None` keeps each tensor's stored dtype; otherwise
    everything but the family's fp32 parameters (decays) is converted to it tensor by tensor while loading (peak
    memory about the model's size, not file + model). Adapters are plugged in by
    `finetune.plugin.attach_adapters` (or `finetune.load_model(path, adapters=[...])`).
    """
    sd = read_state_dict(path)
    model = build_from_state_dict(sd, path, dtype=None if dtype is None else parse_dtype(dtype))
    model.base_fingerprint = fingerprint(sd)  # from the file's own tensors (a few probes read), whatever the dtype
    return model.to(device).eval()
