"""State files: the `blocks.N.att.time_state` `.pth` that RWKV-Runner and RWKV-PEFT share, to and from state adapters.

    rwkv-lora export-state ADAPTER --out FILE.pth [--drop-shifts] [--force]
    rwkv-lora import-state FILE.pth --base BASE --out ADAPTER_DIR [--tokenizer world|PATH] [--force]

A state file is a flat `torch.save` dict with one float32 tensor per layer, `blocks.i.att.time_state` [H, N, N]: the
WKV state a state-tuned model starts from (RWKV-PEFT writes it after state tuning; RWKV-Runner loads it next to a
base model). RWKV-Runner's loader (`backend-python/utils/rwkv.py`, `load_rwkv_state`) requires exactly n_layer
tensors with H * N == n_embd, hands RWKV-7 files to the `rwkv` package as they are, transposes the last two axes of
RWKV-5/6 files first, and starts both token shifts at zero. Our `RNNState.wkv` is in the `rwkv` package's layout for
each family, so the only per-family fact is whether that transpose happens: `Family.time_state_transposed` (this
module names no RWKV version).

The token shifts are not part of the format. A state adapter whose learned shifts are not zero cannot be exported
without changing what it does, so that is refused unless `--drop-shifts` says to write the WKV state alone (state
tuning of families with state files learns only the WKV state, as RWKV-PEFT does, so this only concerns adapters
made otherwise). An imported file becomes a state adapter with zero token shifts: exactly what RWKV-Runner runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from finetune.atomic import atomic_file, check_output
from finetune.errors import FinetuneError
from finetune.adapter_format import ADAPTER_META, read_adapter, save_state_adapter
from finetune.checkpoint import check_keys, fingerprint, read_state_dict
from finetune.models import Family, RNNState, detect, get_family
from finetune.tensorfiles import archive_name, save_pth

TIME_STATE = "blocks.{}.att.time_state"


def _transposed(family: Family, where: str | Path) -> bool:
    """The family's file layout (see `Family.time_state_transposed`); one line when it has no state files."""
    if family.time_state_transposed is None:
        raise FinetuneError(f"{where}: {family.title} has no time_state file format (RWKV-Runner and RWKV-PEFT state "
                            f"files hold one [H, N, N] matrix per head: RWKV-5, 6 and 7)")
    return family.time_state_transposed


def state_to_time_state(state: RNNState, family: Family, where: str | Path = "<state>") -> dict[str, torch.Tensor]:
    """One sequence's state (unbatched [L, ...] or a batch of one) -> the file's tensors
    {"blocks.i.att.time_state": [H, N, N] float32}. The token shifts are not part of the format (see the module
    docstring); the caller decides what to do about non-zero ones."""
    wkv = state.wkv
    if wkv.dim() == 5:  # batched: [B, L, H, N, N]
        if wkv.shape[0] != 1:
            raise FinetuneError(f"{where}: a state file holds one sequence's state; this state has a batch of "
                                f"{wkv.shape[0]}")
        wkv = wkv[0]
    if wkv.dim() != 4 or wkv.shape[-1] != wkv.shape[-2]:
        raise FinetuneError(f"{where}: the WKV state has shape {tuple(wkv.shape)}; a state file needs one N x N "
                            f"matrix per layer and head ([L, H, N, N])")
    if _transposed(family, where):
        wkv = wkv.transpose(-1, -2)
    return {TIME_STATE.format(i): wkv[i].detach().float().cpu().contiguous() for i in range(wkv.shape[0])}


def time_state_to_state(tensors: dict[str, torch.Tensor], family: Family, config: Any,
                        where: str | Path = "<memory>") -> RNNState:
    """A state file's tensors -> the unbatched RNNState (att_shift [L, C], wkv [L, H, N, N], ffn_shift [L, C]) a
    model of `config` starts from, with zero token shifts as RWKV-Runner starts them. One-line FinetuneError naming
    `where` for a file that does not fit the model (layer count, head shape, names, non-finite values)."""
    transposed = _transposed(family, where)
    L, C, H, N = config.n_layer, config.n_embd, config.n_head, config.head_size
    names = [TIME_STATE.format(i) for i in range(L)]
    unknown = sorted(set(tensors) - set(names))
    if unknown:
        raise FinetuneError(f"{where}: unexpected tensor {unknown[0]} (a state file for this {L}-layer model holds "
                            f"exactly {names[0]} .. {names[-1]})")
    missing = [n for n in names if n not in tensors]
    if missing:
        raise FinetuneError(f"{where}: no {missing[0]} ({len(tensors)} layers in the file, the model has {L}); "
                            f"made for another base?")
    for name in names:
        t = tensors[name]
        if tuple(t.shape) != (H, N, N):
            raise FinetuneError(f"{where}: {name} has shape {tuple(t.shape)}, the model needs {(H, N, N)} "
                                f"(heads x head size x head size); made for another base?")
        if not t.is_floating_point() or not torch.isfinite(t.float()).all():
            raise FinetuneError(f"{where}: {name} holds NaN, infinite or non-float values (or values beyond "
                                f"float32's range)")
    wkv = torch.stack([tensors[n].float() for n in names])
    if transposed:
        wkv = wkv.transpose(-1, -2)
    return RNNState(torch.zeros(L, C), wkv.contiguous(), torch.zeros(L, C))


def _base_record(sd: dict[str, torch.Tensor], path: str | Path) -> tuple[Family, Any, dict[str, Any]]:
    """The base's family, config and the `base` record adapters carry (as training writes it)."""

    family = detect(sd, path)
    config = family.config_from_state_dict(sd, path)
    check_keys(sd, family, config, path)
    record = {"fingerprint": fingerprint(sd), "n_layer": config.n_layer, "n_embd": config.n_embd,
              "vocab_size": config.vocab_size, "dim_ffn": config.dim_ffn, "path": str(path)}
    return family, config, record


def export_state(adapter: str | Path, out: str | Path, drop_shifts: bool = False, force: bool = False
                 ) -> dict[str, Any]:
    """Write a state adapter (directory or packed file) as a time_state `.pth`, atomically. Returns a summary."""
    out = check_output(out, force=force, inputs=[adapter])
    a = read_adapter(adapter)
    if a.state is None:
        raise FinetuneError(f"{adapter}: a {a.kind} adapter, not a state adapter (train_type: state); LoRA adapters "
                            f"travel with pack or export-lora")
    family = get_family(str(a.meta.family))
    _transposed(family, adapter)
    shift = max(float(a.state.att_shift.abs().max()), float(a.state.ffn_shift.abs().max()))
    if shift > 0 and not drop_shifts:
        raise FinetuneError(f"{adapter}: its start state has learned token shifts (largest {shift:.3g}), which a "
                            f"time_state file cannot hold (RWKV-Runner starts them at zero); pass --drop-shifts to "
                            f"write the WKV state alone (the model will then differ slightly on the first token)")
    tensors = state_to_time_state(a.state, family, adapter)
    first = next(iter(tensors.values()))
    if first.shape[0] * first.shape[1] != a.state.att_shift.shape[-1]:
        raise FinetuneError(f"{adapter}: WKV state {tuple(first.shape)} per layer does not match the width "
                            f"{a.state.att_shift.shape[-1]} of its token shifts")
    with atomic_file(out) as tmp:  # a plain dict of tensors, as torch.save writes it: what RWKV-Runner loads
        save_pth(tensors, tmp, archive=archive_name(out))
    return {"out": str(out), "layers": len(tensors), "shape": tuple(first.shape), "family": family.title,
            "dropped_shifts": shift > 0}


def import_state(file: str | Path, base: str | Path, out: str | Path, tokenizer: str | None = None,
                 force: bool = False) -> dict[str, Any]:
    """Turn a time_state `.pth` into a state adapter directory for `base` (checked against its shapes), atomically."""
    out = check_output(out, force=force, inputs=[file, base], marker=ADAPTER_META)
    sd = read_state_dict(base)  # memory-mapped for zip checkpoints: only shapes and a few values are read
    family, config, record = _base_record(sd, base)
    del sd
    state = time_state_to_state(read_state_dict(file), family, config, file)  # weights_only: never unpickled
    meta = {"family": family.name, "base": record, "tokenizer": tokenizer, "kind": "state",
            "recipe": {"imported_from": str(file), "tool": "RWKV-Runner / RWKV-PEFT time_state file"}}
    save_state_adapter(state, out, meta)
    return {"out": str(out), "layers": config.n_layer, "shape": tuple(state.wkv.shape[1:]), "family": family.title}


# ----------------------------------------------------------------------------------------------------------------------
# CLI


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-state", help="write a state adapter as an RWKV-Runner / RWKV-PEFT time_state .pth",
                       description="Write a state adapter (train_type: state) as the `blocks.N.att.time_state` [H, N, "
                                   "N] .pth that RWKV-Runner loads next to its base model and RWKV-PEFT writes.")
    p.add_argument("adapter", help="state adapter directory or packed .safetensors")
    p.add_argument("--out", required=True, help="output FILE.pth")
    p.add_argument("--drop-shifts", action="store_true",
                   help="export even if the adapter learned token shifts (the file format has none)")
    p.add_argument("--force", "--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=run_export_state)

    p = sub.add_parser("import-state", help="turn an RWKV-Runner / RWKV-PEFT time_state .pth into a state adapter",
                       description="Read a `blocks.N.att.time_state` .pth (weights only, never unpickled) and write a "
                                   "state adapter for BASE, checked against its layers and heads.")
    p.add_argument("file", help="time_state .pth")
    p.add_argument("--base", required=True, help="the base checkpoint the state was tuned for")
    p.add_argument("--out", required=True, help="output adapter directory")
    p.add_argument("--tokenizer", help="tokenizer to record (world or a tokenizer.json path)")
    p.add_argument("--force", "--overwrite", action="store_true",
                   help="replace an existing adapter directory written by rwkv-lora")
    p.set_defaults(func=run_import_state)


def run_export_state(args: argparse.Namespace) -> int:
    s = export_state(args.adapter, args.out, drop_shifts=args.drop_shifts, force=args.force)
    note = " (learned token shifts dropped)" if s["dropped_shifts"] else ""
    print(f"wrote {s['out']}: {s['family']} time_state, {s['layers']} layers x {list(s['shape'])}{note}")
    return 0


def run_import_state(args: argparse.Namespace) -> int:
    s = import_state(args.file, args.base, args.out, tokenizer=args.tokenizer, force=args.force)
    print(f"wrote {s['out']}: {s['family']} state adapter, {s['layers']} layers x {list(s['shape'])}, token shifts 0")
    return 0
