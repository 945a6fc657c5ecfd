"""BlinkDL RWKV-4 checkpoint files: read safely, recognise, check, fingerprint, write atomically.

Files are flat state dicts in RWKV-LM's raw layout (see RWKV4-FACTS: raw `time_decay`, `time_mix_*` of shape
[1, 1, C], `blocks.0.ln0`). They are read with `torch.load(weights_only=True)` (never unpickling code) or with
safetensors, and written back in the same layout: never after an inference loader's rewrites.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch

from finetune.atomic import atomic_file
from finetune.errors import FinetuneError
from finetune.model import RWKVConfig

# keys that only newer RWKV generations have: (regex, version)
NEWER_VERSIONS = [
    (re.compile(r"\.att\.(x_r|w0|a0|v0|k_k|k_a|r_k)$"), "7"),
    (re.compile(r"\.att\.time_maa"), "6"),
    (re.compile(r"\.att\.ln_x\."), "5"),
]


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
            raise FinetuneError(f"{path}: cannot read safetensors file ({_reason(e)})") from None
    else:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=_zipfile(path))
        except Exception as e:
            reason = _reason(e)
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


def _reason(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:200]


def rwkv_version(sd: dict[str, torch.Tensor]) -> str | None:
    """'4' for RWKV-4, '5'/'6'/'7' for newer generations, None when this is not an RWKV state dict at all."""
    if "emb.weight" not in sd or not any(k.startswith("blocks.0.att.") for k in sd):
        return None
    for pattern, version in NEWER_VERSIONS:
        if any(pattern.search(k) for k in sd):
            return version
    return "4"


def config_from_state_dict(sd: dict[str, torch.Tensor], path: str | Path = "<memory>") -> RWKVConfig:
    """n_layer, n_embd, vocab and ffn width, read off the tensors (never typed by hand)."""
    version = rwkv_version(sd)
    if version is None:
        raise FinetuneError(f"{path}: not an RWKV checkpoint (no emb.weight and blocks.N.att.* keys)")
    if version != "4":
        raise FinetuneError(f"{path}: this is an RWKV-{version} checkpoint; only RWKV-4 is supported")
    try:
        vocab, n_embd = sd["emb.weight"].shape
        n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        dim_ffn = sd["blocks.0.ffn.key.weight"].shape[0]
    except (KeyError, ValueError) as e:
        raise FinetuneError(f"{path}: incomplete RWKV-4 checkpoint (missing or malformed {e})") from None
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


def check_keys(sd: dict[str, torch.Tensor], config: RWKVConfig, path: str | Path = "<memory>") -> None:
    """Raise a one-line FinetuneError unless `sd` has exactly the RWKV-4 keys with the right shapes."""
    expected = expected_shapes(config)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}")
        raise FinetuneError(f"{path}: not a complete RWKV-4 checkpoint ({'; '.join(parts)})")
    for k, shape in expected.items():
        if tuple(sd[k].shape) != shape:
            raise FinetuneError(f"{path}: {k} has shape {tuple(sd[k].shape)}, expected {shape}")


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
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in sd.items()}, tmp, metadata={"format": "pt"})
        else:
            torch.save(sd, tmp)
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
