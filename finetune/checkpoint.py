"""BlinkDL RWKV checkpoint files: read safely, recognise the generation, check, build the model, fingerprint, write.

Files are flat state dicts in RWKV-LM's raw layout (see RWKV4-FACTS: raw `time_decay`, `time_mix_*` of shape
[1, 1, C], `blocks.0.ln0`). They are read with `torch.load(weights_only=True)` (never unpickling code) or with
safetensors, and written back in the same layout: never after an inference loader's rewrites.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from finetune.atomic import atomic_file
from finetune.errors import FinetuneError, first_line
from finetune.models import Family, detect, parse_dtype
from finetune.tensorfiles import archive_name, save_pth, save_safetensors

# what a checkpoint's tensors may be: quantized or integer files cannot be trained, merged or run here
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a {name: tensor} dict (CPU). Any problem is a one-line FinetuneError."""
    path = Path(path)
    if not path.is_file():
        raise FinetuneError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path))
        except Exception as e:
            raise FinetuneError(f"{path}: cannot read safetensors file ({first_line(e)})") from None
    else:
        try:
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


def fingerprint(sd: dict[str, torch.Tensor]) -> str:
    """A short id of a base model: its shapes and a few of its values (rounded to bf16, so the same base stored in
    fp32 or bf16 has the same fingerprint). Adapters record it; merge and plug-in refuse a different base."""
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(f"{k}:{tuple(sd[k].shape)};".encode())
    probes = ["emb.weight", "blocks.0.att.time_decay", "blocks.0.att.key.weight", "ln_out.weight", "head.weight"]
    for k in probes:
        if k in sd:
            t = sd[k].detach().reshape(-1)[:4096].float().to(torch.bfloat16).view(torch.int16)
            h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


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


def check_values(sd: dict[str, torch.Tensor], path: str | Path = "<memory>") -> None:
    """Raise a one-line FinetuneError naming the first tensor that holds NaN or an infinity."""
    for k, v in sd.items():
        if not all_finite(v):
            raise FinetuneError(f"{path}: {k} holds NaN or infinite values; the checkpoint is damaged (a diverged "
                                f"training run?)")


def build_from_state_dict(state_dict: dict[str, torch.Tensor], path: str | Path = "<memory>") -> torch.nn.Module:
    """The model of the checkpoint's family whose parameters are the checkpoint's tensors (no copy, no random init:
    built on the meta device). Keys and shapes are checked first."""
    family = detect(state_dict, path)
    config = family.config_from_state_dict(state_dict, path)
    check_keys(state_dict, family, config, path)
    check_values(state_dict, path)
    with torch.device("meta"):
        model = family.model_class(config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.checkpoint_dtypes = {k: v.dtype for k, v in state_dict.items()}
    # the base's identity as stored, before any cast: adapters made on this file must plug in whatever dtype the
    # user then asks for (fingerprinting the cast weights made `--dtype fp16` refuse them)
    model.base_fingerprint = fingerprint(state_dict)
    for name, p in model.named_parameters():  # decays always in fp32 (exact: bf16/fp16 -> fp32 loses nothing)
        if name.endswith(family.fp32_params) and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def load_model(path: str | Path, dtype: torch.dtype | str | None = None,
               device: str | torch.device = "cpu") -> torch.nn.Module:
    """Load a BlinkDL RWKV checkpoint (`.pth` or `.safetensors`) of any supported generation, in eval mode.

    Every dimension comes from the tensors themselves. `dtype=None` keeps each tensor's stored dtype; otherwise
    everything but the family's fp32 parameters (decays) is cast to it. Adapters are plugged in by
    `finetune.adapters.attach_adapters` (or `finetune.load_model(path, adapters=[...])`).
    """
    model = build_from_state_dict(read_state_dict(path), path)
    if dtype is not None:
        model.cast(parse_dtype(dtype))
    return model.to(device).eval()
