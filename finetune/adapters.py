"""Adapters: LoRA injected with `peft`, plus the small RWKV tensors trained in full; saved so they describe themselves.

An adapter directory (what training writes to OUT_DIR/final/ and OUT_DIR/step-N/):

    adapter_config.json          peft's own config (r, lora_alpha, target_modules, ...): PeftModel.from_pretrained
    adapter_model.safetensors    peft's own LoRA weights (keys base_model.model.blocks.N.att.key.lora_A.weight, ...)
    trained_tensors.safetensors  the tensors trained in full, under their checkpoint names (blocks.N.att.time_decay,
                                 blocks.N.ln1.weight, emb.weight, ...); absent when none were
    rwkv_lora.json               our metadata: format, kind, base (fingerprint, n_layer, n_embd, vocab_size,
                                 dim_ffn), tokenizer, r, alpha, dropout, use_rslora, scaling, parts, train, recipe

Merging and plug-in read `rwkv_lora.json` and never ask the user for alpha.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn

from finetune.errors import FinetuneError

ADAPTER_META = "rwkv_lora.json"
TRAINED_TENSORS = "trained_tensors.safetensors"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
FORMAT = "rwkv-lora-adapter"
FORMAT_VERSION = 1

# the projections LoRA can adapt, by part
LORA_PARTS: dict[str, tuple[str, ...]] = {
    "att": ("key", "value", "receptance", "output"),
    "ffn": ("key", "value", "receptance"),
}


def _is_time(name: str) -> bool:
    return ".att.time_" in name or ".ffn.time_" in name


def _is_ln(name: str) -> bool:
    return ".ln0." in name or ".ln1." in name or ".ln2." in name or name.startswith("ln_out.")


# the small tensors users train in full next to LoRA, by group
FULL_GROUPS = {
    "time": _is_time,
    "ln": _is_ln,
    "emb": lambda n: n == "emb.weight",
    "head": lambda n: n == "head.weight",
}


def lora_target_regex(parts: Iterable[str]) -> str:
    """A regex for peft's `target_modules` that matches exactly the chosen projections (full-name match)."""
    alts = []
    for part in parts:
        if part not in LORA_PARTS:
            raise FinetuneError(f"unknown LoRA part {part!r}; choose from {', '.join(LORA_PARTS)}")
        alts.append(rf"blocks\.\d+\.{part}\.({'|'.join(LORA_PARTS[part])})")
    return "^(" + "|".join(alts) + ")$"


def full_tensor_names(names: Iterable[str], groups: Iterable[str]) -> list[str]:
    """Checkpoint names of the tensors trained in full for the given groups (time, ln, emb, head)."""
    groups = list(groups)
    for g in groups:
        if g not in FULL_GROUPS:
            raise FinetuneError(f"unknown trainable group {g!r}; choose from {', '.join(FULL_GROUPS)}")
    return [n for n in names if any(FULL_GROUPS[g](n) for g in groups)]


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
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=lora_target_regex(parts),
                            use_rslora=use_rslora, init_lora_weights=init_lora_weights, bias="none")
        peft_model = get_peft_model(model, config)
    else:
        raise FinetuneError("LoRA needs r > 0 and at least one part (att, ffn)")
    base = unwrap(peft_model)
    for name in full_tensor_names(dict(base.named_parameters()), train):
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
    return {n: params[n].detach().float().cpu().contiguous() for n in full_tensor_names(params, groups)}


def save_adapter(peft_model: nn.Module, out_dir: str | Path, meta: dict[str, Any]) -> Path:
    """Write an adapter directory atomically (a temp dir renamed into place; an older one is replaced).

    meta must hold at least: base (dict with fingerprint and shapes), tokenizer, r, alpha, parts, train; the
    format/version/kind/scaling fields are filled in here.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        peft_model.save_pretrained(str(tmp), safe_serialization=True)
        full = trained_full_tensors(peft_model, meta.get("train", ()))
        if full:
            save_file(full, str(tmp / TRAINED_TENSORS))
        cfg = next(iter(peft_model.peft_config.values()))
        meta = dict(meta)
        meta.update(format=FORMAT, version=FORMAT_VERSION, kind=meta.get("kind", "lora"),
                    r=cfg.r, alpha=cfg.lora_alpha, use_rslora=bool(cfg.use_rslora),
                    scaling=lora_scaling(cfg.r, cfg.lora_alpha, bool(cfg.use_rslora)),
                    trained_tensors=sorted(full))
        (tmp / ADAPTER_META).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


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

    @property
    def scaling(self) -> float:
        return float(self.meta["scaling"])

    def delta(self, module: str) -> torch.Tensor:
        """scaling * B @ A for one adapted module, float32."""
        A, B = self.lora[module]
        return self.scaling * (B @ A)


def is_adapter(path: str | Path) -> bool:
    path = Path(path)
    return (path / ADAPTER_META).is_file()


def read_adapter(path: str | Path) -> Adapter:
    """Read an adapter directory (safetensors only; nothing is unpickled). One-line FinetuneError on any problem."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise FinetuneError(f"{path}: no such adapter")
    if not is_adapter(path):
        raise FinetuneError(f"{path}: not an rwkv-lora adapter (no {ADAPTER_META})")
    try:
        meta = json.loads((path / ADAPTER_META).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FinetuneError(f"{path / ADAPTER_META}: unreadable adapter metadata ({e})") from None
    if meta.get("format") != FORMAT:
        raise FinetuneError(f"{path / ADAPTER_META}: not an rwkv-lora adapter (format {meta.get('format')!r})")
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
    pairs = {}
    for module, (A, B) in lora.items():
        if A is None or B is None:
            raise FinetuneError(f"{weights}: {module} has only one of lora_A / lora_B")
        if A.shape[0] != B.shape[1]:
            raise FinetuneError(f"{weights}: rank mismatch for {module}: A is {tuple(A.shape)}, B is {tuple(B.shape)}")
        pairs[module] = (A, B)
    full = {}
    if (path / TRAINED_TENSORS).exists():
        try:
            full = {k: v.float() for k, v in load_file(str(path / TRAINED_TENSORS)).items()}
        except Exception as e:
            raise FinetuneError(f"{path / TRAINED_TENSORS}: corrupted or truncated ({str(e).splitlines()[0]})") \
                from None
    return Adapter(path=path, meta=meta, lora=pairs, full=full)


def describe_adapter(path: str | Path) -> str:
    a = read_adapter(path)
    m = a.meta
    base = m.get("base", {})
    return "\n".join([
        f"file:        {path}",
        f"kind:        {m.get('kind', 'lora')} adapter (rwkv-lora format {m.get('version')})",
        f"rank:        {m.get('r')}   alpha: {m.get('alpha')}   scaling: {m.get('scaling'):.4g}"
        + ("   (rsLoRA)" if m.get("use_rslora") else ""),
        f"parts:       {', '.join(m.get('parts', [])) or '-'}   trained in full: {', '.join(m.get('train', [])) or '-'}",
        f"modules:     {len(a.lora)} LoRA pairs, {len(a.full)} full tensors",
        f"base:        {base.get('n_layer')} x {base.get('n_embd')}, vocab {base.get('vocab_size')}, "
        f"fingerprint {base.get('fingerprint')}",
        f"tokenizer:   {m.get('tokenizer')}",
    ])
