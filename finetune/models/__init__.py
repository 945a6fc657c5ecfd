"""Model families: one module per RWKV generation, and the registry that tells a checkpoint's generation.

To add a generation: write `finetune/models/rwkvN.py` (the nn.Module in the checkpoint's key layout, its config
reader, expected shapes, RWKV-LM init and a `FAMILY = Family(...)`), import it below and list it in FAMILIES. Nothing
above this layer changes (see docs/architecture.md).
"""

from __future__ import annotations

from typing import Any

import torch

from finetune.errors import FinetuneError
from finetune.models import rwkv4, rwkv5, rwkv6, rwkv7
from finetune.models.family import Family, RNNState

__all__ = ["FAMILIES", "Family", "RNNState", "detect", "detect_version", "family_for", "get_family", "parse_dtype",
           "DTYPES", "DTYPE_NAMES", "LORA_PART_CHOICES", "FULL_GROUP_CHOICES"]

# generation (as `detect_version` names it) -> family; versions missing here are recognised but refused
FAMILIES: dict[str, Family] = {
    "4": rwkv4.FAMILY,
    "5.2": rwkv5.FAMILY,
    "6": rwkv6.FAMILY,
    "7": rwkv7.FAMILY,
}

# `rwkv-lora init --arch` names -> generation
ARCHES: dict[str, str] = {"4": "4", "5": "5.2", "6": "6", "7": "7"}

# what the `rwkv` package and RWKV-LM call the versions we recognise but cannot load
UNSUPPORTED = {
    "5.0": "RWKV-5.0 (no att.gate)",
    "5.1": "RWKV-5.1 (1-D time_decay)",
    "7a": "RWKV-7a (DeepEmbed: ffn.s_emb)",
    "7b": "RWKV-7b (DEA: att.qkv / lnq)",
}


def detect_version(sd: dict[str, Any]) -> str | None:
    """The RWKV generation of a state dict by the rules of BlinkDL's `rwkv` package ('4', '5.0', '5.1', '5.2', '6',
    '7', '7a', '7b'), or None when it is not an RWKV checkpoint at all. Values may be tensors or anything with a
    `.shape` (e.g. meta tensors)."""
    keys = list(sd)
    if "emb.weight" not in sd or not any(k.startswith("blocks.0.att.") or k.startswith("blocks.0.ffn.")
                                         for k in keys):
        return None
    if any(".ffn.s_emb" in k or ".ffn.s0" in k for k in keys):
        return "7a"
    if any(".att.qkv" in k or ".att.lnq" in k or ".lnq." in k for k in keys):
        return "7b"
    if any(k.endswith((".att.r_k", ".att.x_r", ".att.w0")) for k in keys):
        return "7"
    if any(".att.time_maa" in k for k in keys):
        return "6"
    if any(".att.ln_x." in k for k in keys):
        if not any(k.endswith(".att.gate.weight") for k in keys):
            return "5.0"
        decay = sd.get("blocks.0.att.time_decay")
        if decay is not None and len(decay.shape) == 2 and decay.shape[1] > 1:
            return "5.2"
        return "5.1"
    return "4"


def detect(sd: dict[str, Any], path: Any = "<memory>") -> Family:
    """The family of a checkpoint's state dict; a one-line FinetuneError for anything we cannot load."""
    version = detect_version(sd)
    if version is None:
        raise FinetuneError(f"{path}: not an RWKV checkpoint (no emb.weight and blocks.N.att.* keys)")
    if version not in FAMILIES:
        name = UNSUPPORTED.get(version, f"RWKV-{version}")
        raise FinetuneError(f"{path}: this is an {name} checkpoint, which this version of rwkv-lora cannot load "
                            f"(supported: {', '.join(f.title for f in FAMILIES.values())})")
    return FAMILIES[version]


def get_family(name: str) -> Family:
    """A family by the name adapters record ("rwkv4", ...)."""
    for fam in FAMILIES.values():
        if fam.name == name:
            return fam
    raise FinetuneError(f"unknown model family {name!r}; known: {', '.join(f.name for f in FAMILIES.values())}")


def family_for(model: torch.nn.Module) -> Family:
    """The family of a built model (by its class)."""
    for fam in FAMILIES.values():
        if isinstance(model, fam.model_class):
            return fam
    raise FinetuneError(f"{type(model).__name__} is not an RWKV model of a known family")


# the choices settings and command lines offer, defined once: LoRA parts and full-training groups of any family,
# and the dtype names
LORA_PART_CHOICES: tuple[str, ...] = tuple(dict.fromkeys(p for f in FAMILIES.values() for p in f.lora_parts))
FULL_GROUP_CHOICES: tuple[str, ...] = tuple(dict.fromkeys(g for f in FAMILIES.values() for g in f.full_groups))
DTYPE_NAMES = ("fp32", "bf16", "fp16")

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise FinetuneError(f"unknown dtype {dtype!r}; use one of fp32, bf16, fp16") from None
