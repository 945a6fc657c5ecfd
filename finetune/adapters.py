"""LoRA for training: peft wraps the model, and the trained tensors are saved as an adapter directory.

This is the only module that uses peft. What LoRA may target and which tensors may be trained in full come from the
model's family (`Family.lora_parts`, `Family.full_groups`); the on-disk format, the LoRA formula and the adapter
description live in `finetune.adapter_format`, which `save_adapter` writes through.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
import torch.nn as nn

from finetune.adapter_format import AdapterMeta, as_meta, peft_lora_key, write_adapter
from finetune.errors import FinetuneError
from finetune.models import Family, family_for

# LoRA initialisations, by the names recipes use -> peft's `init_lora_weights`
LORA_INITS: dict[str, Any] = {"default": True, "gaussian": "gaussian", "pissa": "pissa"}


def lora_target_regex(parts: Iterable[str], family: Family) -> str:
    """A regex for peft's `target_modules` that matches exactly the chosen projections (full-name match)."""
    alts = []
    for part in parts:
        if part not in family.lora_parts:
            raise FinetuneError(f"unknown LoRA part {part!r}; choose from {', '.join(family.lora_parts)}")
        alts.append(rf"blocks\.\d+\.{part}\.({'|'.join(family.lora_parts[part])})")
    return "^(" + "|".join(alts) + ")$"


def full_tensor_names(names: Iterable[str], groups: Iterable[str], family: Family) -> list[str]:
    """Checkpoint names of the tensors trained in full for the given groups (time, ln, emb, head)."""
    groups = list(groups)
    for g in groups:
        if g not in family.full_groups:
            raise FinetuneError(f"unknown trainable group {g!r}; choose from {', '.join(family.full_groups)}")
    return [n for n in names if any(family.full_groups[g](n) for g in groups)]


def add_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
             parts: Iterable[str] = ("att", "ffn"), train: Iterable[str] = (), use_rslora: bool = False,
             init: str = "default") -> nn.Module:
    """Wrap a model in a peft LoRA model: everything frozen except LoRA and the `train` groups.

    init: "default" (peft: A kaiming-uniform, B zeros), "gaussian", or "pissa" (peft's names).
    Returns the `peft.PeftModel`; the model itself is `unwrap(peft_model)`.
    """
    # peft is imported when a model is wrapped or saved, not with this module: `finetune.config` reads LORA_INITS
    # and peft is slow to import
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    family = family_for(model)
    parts = list(parts)
    if init not in LORA_INITS:
        raise FinetuneError(f"unknown LoRA init {init!r}; choose from {', '.join(LORA_INITS)}")
    if not parts or r < 1:
        raise FinetuneError(f"LoRA needs r > 0 and at least one part ({', '.join(family.lora_parts)})")
    for p in model.parameters():
        p.requires_grad_(False)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=lora_target_regex(parts, family),
                        use_rslora=use_rslora, init_lora_weights=LORA_INITS[init], bias="none")
    with warnings.catch_warnings():  # peft's note on torchao weights is about peft's own merge, never used here
        warnings.filterwarnings("ignore", message=".*get_apply_tensor_subclass.*")
        peft_model = get_peft_model(model, config)
    if init == "pissa":
        # PiSSA moves the top singular directions out of each weight into (A0, B0): the wrapped base is no longer
        # the checkpoint. Keep the initial factors so that `save_adapter` can write the change against the real base
        peft_model.pissa_initial = _lora_pairs(get_peft_model_state_dict(peft_model))
    base = unwrap(peft_model)
    for name in full_tensor_names(dict(base.named_parameters()), train, family):
        base.get_parameter(name).requires_grad_(True)
    return peft_model


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def trained_full_tensors(peft_model: nn.Module, groups: Iterable[str]) -> dict[str, torch.Tensor]:
    """The fully trained tensors, under checkpoint names, float32 on the CPU."""
    base = unwrap(peft_model)
    params = dict(base.named_parameters())
    return {n: params[n].detach().float().cpu().contiguous()
            for n in full_tensor_names(params, groups, family_for(base))}


def _lora_pairs(peft_state: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    pairs: dict[str, list] = {}
    for key, t in peft_state.items():
        which = peft_lora_key(key)
        if which is not None:
            pairs.setdefault(which[0], [None, None])[which[1]] = t.detach().float().cpu().clone()
    return {m: (A, B) for m, (A, B) in pairs.items()}


def save_adapter(peft_model: nn.Module, out_dir: str | Path, meta: AdapterMeta | Mapping[str, Any]) -> Path:
    """Write the trained LoRA (and `meta.train` tensors) as an adapter directory, atomically.

    meta (an AdapterMeta or the trainer's dict) holds base, tokenizer, parts, train, recipe; r, alpha, use_rslora
    and the family are taken from the model. A PiSSA run is saved as the change against the original base (rank 2r:
    [B, -B0] @ [A; A0] at the same scaling), which is what merging and plug-in apply to the checkpoint.
    """
    from peft import get_peft_model_state_dict

    cfg = next(iter(peft_model.peft_config.values()))
    fields = meta.to_dict() if isinstance(meta, AdapterMeta) else dict(meta)
    fields.pop("scaling", None)  # derived from what the model says below
    fields.update(kind="lora", family=family_for(unwrap(peft_model)).name, r=cfg.r, alpha=cfg.lora_alpha,
                  use_rslora=bool(cfg.use_rslora))
    meta = as_meta(fields, out_dir)
    lora = _lora_pairs(get_peft_model_state_dict(peft_model))
    initial = getattr(peft_model, "pissa_initial", None)
    if initial is not None:
        lora = {m: (torch.cat([A, initial[m][0]], 0), torch.cat([B, -initial[m][1]], 1)) for m, (A, B) in lora.items()}
        meta.r = 2 * cfg.r  # the same scaling at twice the rank: alpha / r -> 2 alpha / 2r, alpha / sqrt(r) likewise
        meta.alpha = cfg.lora_alpha * (math.sqrt(2) if meta.use_rslora else 2)
    return write_adapter(out_dir, meta, lora, trained_full_tensors(peft_model, meta.train))
