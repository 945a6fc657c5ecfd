"""Merging adapters into a base checkpoint, packing adapters into one file, and RWKV-LM-LoRA interop.

    rwkv-lora merge --base base.pth --adapter DIR [--adapter DIR2:0.5] --out merged.pth [--dtype bf16]
                    [--format pth|safetensors|hf] [--tokenizer world|PATH] [--force] [--overwrite]
    rwkv-lora pack DIR --out NAME.safetensors [--force]
    rwkv-lora import-lora rwkv-lm-lora.pth --alpha 16 --base base.pth --out DIR [--overwrite]
    rwkv-lora export-lora DIR --out rwkv-lm-lora.pth [--force]

Every output is checked before any work (`finetune.atomic.check_output`): never one of the command's inputs, an
existing file only with --force/--overwrite, an existing directory only if it is ours (an adapter, or an HF directory
holding `rwkv_lora_merge.json`, the provenance merge writes there).

Merge: W' = W + weight * lora_delta(A, B, scaling) for every adapted matrix (`finetune.adapter_format`), W' = W +
weight * (T - W) for every tensor trained in full, computed in fp32, checked finite, and cast once to the base dtype
(or --dtype). The output has exactly the base's keys and
shapes, in BlinkDL's raw layout. It is produced tensor by tensor: the base is memory-mapped, each output tensor is
computed, written at its place in the output file and dropped, so the peak memory is about one copy of the base.
Outputs are written to a temp file (or directory) renamed into place; nothing is left behind on error.

RWKV-LM-LoRA (Blealtan) layout: a flat `.pth` state dict with `blocks.N.att.key.lora_A` [r, in] and `...lora_B`
[out, r] next to the tensors trained in full under their checkpoint names (some files also hold the frozen base
weights); merged as W + (alpha / r) * B @ A with r = lora_B.shape[1]; alpha is not stored in the file.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import sys
import warnings
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from finetune.adapter_format import (ADAPTER_META, Adapter, AdapterMeta, add_lora_delta_, adapter_files, as_float,
                                     adapter_tokenizer_json, blend_full_, check_adapter, check_pairs, pack_adapter,
                                     parse_adapter_spec, read_adapter, tokenizer_record, write_adapter)
from finetune.atomic import atomic_dir, atomic_file, check_output
from finetune.checkpoint import (FINGERPRINT_PROBES, all_finite, base_record, check_keys, fingerprint,
                                 read_state_dict)
from finetune.errors import FinetuneError, first_line
from finetune.hf import hf_config, hf_name, tokenizer_vocab_size, world_tokenizer_json, write_tokenizer_files
from finetune.models import DTYPE_NAMES, detect, parse_dtype
from finetune.tensorfiles import (ST_DTYPES, Plan, Producer, archive_name, save_pth, write_pth_streaming,
                                  write_safetensors_streaming)
from finetune.tokenizer import WORLD_VOCAB_SIZE, WorldTokenizer, read_world_vocab

FORMATS = ("pth", "safetensors", "hf")
# the families the hf format can write, and as what
HF_FAMILIES = {"rwkv4": "transformers' RwkvForCausalLM (RWKV-4)", "rwkv7": "rwkv7-hf's RWKV-7 directory"}
HF_MARKER = "rwkv_lora_merge.json"  # provenance written into HF output directories; marks them as ours to replace


# ----------------------------------------------------------------------------------------------------------------------
# The base, read lazily


class LazyBase:
    """A base checkpoint opened without materialising it: `.pth` memory-mapped (weights_only), `.safetensors` read
    tensor by tensor. `shapes`, `dtypes`, `get(name)`, `fingerprint`, `config`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            what = "a directory, not a checkpoint file" if self.path.is_dir() else "no such base checkpoint"
            raise FinetuneError(f"{self.path}: {what}")
        self._st = None
        if self.path.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                self._st = safe_open(str(self.path), framework="pt")
                keys = list(self._st.keys())
                metas = {}
                for k in keys:
                    sl = self._st.get_slice(k)
                    metas[k] = torch.empty(sl.get_shape(), dtype=_dtype_from_st(sl.get_dtype()), device="meta")
            except Exception as e:  # safetensors raises its own exception types
                raise FinetuneError(f"{self.path}: cannot read safetensors base ({first_line(e)})") from None
            self._sd = None
        else:
            self._sd = read_state_dict(self.path)  # mmap'd when the file is a zip checkpoint
            metas = self._sd
        self.family = detect(metas, self.path)
        self.config = self.family.config_from_state_dict(metas, self.path)
        check_keys(metas, self.family, self.config, self.path)
        self.names = list(metas)
        self.shapes = {k: tuple(v.shape) for k, v in metas.items()}
        self.dtypes = {k: v.dtype for k, v in metas.items()}
        # the fingerprint reads only its probe tensors' values: load just those
        self.fingerprint = fingerprint({k: (self.get(k) if k in FINGERPRINT_PROBES else v) for k, v in metas.items()})

    def get(self, name: str) -> torch.Tensor:
        if self._sd is not None:
            return self._sd[name]
        try:
            return self._st.get_tensor(name)
        except Exception as e:  # safetensors raises its own exception types
            raise FinetuneError(f"{self.path}: cannot read {name} ({first_line(e)}); is the file truncated?") \
                from None

    def record(self) -> dict[str, Any]:
        """What an adapter made for this base records about it."""
        return base_record(self.config, self.fingerprint, self.path)


def _dtype_from_st(name: str) -> torch.dtype:
    rev = {v: k for k, v in ST_DTYPES.items()}
    if name not in rev:
        raise ValueError(f"unsupported dtype {name}")
    return rev[name]


# ----------------------------------------------------------------------------------------------------------------------
# Merge


def merge_adapters(base: str | Path, adapters: Sequence, out: str | Path, dtype: str | torch.dtype | None = None,
                   fmt: str | None = None, force: bool = False, log: Callable[[str], None] | None = None,
                   overwrite: bool = False, tokenizer: str | None = None) -> dict[str, Any]:
    """Merge adapters (paths, `PATH:W` strings, or (path, weight) pairs) into `base`, writing `out`.

    fmt: "pth" (BlinkDL, default unless `out` ends in .safetensors), "safetensors", or "hf" (a Hugging Face
    directory: RwkvForCausalLM for RWKV-4, rwkv7-hf's conversion for RWKV-7; refused for RWKV-5/6). `force`: accept adapters made for another base (shapes must still fit); `force` or
    `overwrite`: replace an existing output (an existing directory only if it is an HF directory merge wrote).
    `tokenizer` (world or a tokenizer.json path): what an hf directory gets, instead of the adapters' record.
    Returns a summary dict (tensors changed, dtype, format, seconds).
    """
    t0 = time.perf_counter()
    out = Path(out)
    fmt = fmt or ("safetensors" if out.suffix == ".safetensors" else "pth")
    if fmt not in FORMATS:
        raise FinetuneError(f"unknown output format {fmt!r}; choose from {', '.join(FORMATS)}")
    if not adapters:
        raise FinetuneError("give at least one --adapter")
    specs = [parse_adapter_spec(s) for s in adapters]
    # before any work: never write over the base or an adapter (or a directory holding them), replace an existing
    # output only when asked, and an existing directory only when it is an HF directory this command wrote
    inputs = [Path(base), *(f for p, _ in specs if not isinstance(p, Adapter) for f in adapter_files(p))]
    check_output(out, force=force or overwrite, inputs=inputs, marker=HF_MARKER if fmt == "hf" else None,
                 flag="--overwrite")
    if fmt == "hf" and out.exists() and not out.is_dir():
        raise FinetuneError(f"{out}: exists and is not a directory (the hf format writes a directory)")
    if fmt != "hf" and out.is_dir():
        raise FinetuneError(f"{out}: is a directory; give a file name for the {fmt} format")
    b = LazyBase(base)
    if fmt == "hf" and b.family.name not in HF_FAMILIES:
        raise FinetuneError(f"{b.path}: --format hf writes {' or '.join(HF_FAMILIES.values())}; transformers has no "
                            f"{b.family.title} architecture to load it into: use --format pth or safetensors")
    loaded = [(read_adapter(p), w) for p, w in specs]
    for a, _ in loaded:
        if a.state is not None:
            raise FinetuneError(f"adapter {a.path}: a state adapter is a start state, not a weight change; it cannot "
                                f"be merged (plug it in with --adapter when generating)")
        check_adapter(a, b.shapes, b.fingerprint, family=b.family, force=force, base_name=str(b.path))
        quantized = a.meta.extra.get("base_quant") or a.meta.recipe.get("base_quant") or "none"
        if quantized not in ("none", "bf16"):  # bf16: the published files' own precision
            # the usual QLoRA practice: merge into the full-precision base; the adapter learned around the
            # quantized weights, so its fit to them is not what the merged model computes
            note = (f"adapter {a.path} was trained on a {quantized}-quantized base; it is merged into the "
                    f"full-precision {b.path.name}, so the quantization error it was trained against is not in the "
                    f"merged model (outputs can differ slightly from the quantized training run)")
            if log is not None:
                log(f"warning: {note}")
            else:
                warnings.warn(note, stacklevel=2)
    out_dtype = parse_dtype(dtype) if dtype is not None else None
    tokenizer_json, world = hf_tokenizer_json(tokenizer, loaded, b.config.vocab_size, log) if fmt == "hf" else (
        None, False)

    # what happens to each tensor: a list of (kind, adapter, weight)
    todo: dict[str, list] = collections.defaultdict(list)
    for a, w in loaded:
        for key in a.full:
            todo[key].append(("full", a, w))
        for module in a.lora:
            todo[f"{module}.weight"].append(("lora", a, w))

    # Two reused buffers (an fp32 workspace, an output-dtype buffer): allocating fresh memory for every tensor costs
    # more in page faults than the arithmetic. Two slots: tensor i+1 is computed (slot (i+1) % 2) while tensor i is
    # being written by a writer thread (see `finetune.tensorfiles.pipelined`).
    big = max((math.prod(b.shapes[k]) for k in b.names), default=0)
    buffers: dict[torch.dtype, torch.Tensor] = {}

    def buffer(shape: tuple, dt: torch.dtype, slot: int) -> torch.Tensor:
        if (dt, slot) not in buffers:
            buffers[dt, slot] = torch.empty(big, dtype=dt)
        return buffers[dt, slot][: math.prod(shape)].view(shape)

    def produce(name: str, slot: int = 0) -> torch.Tensor:
        # every tensor is checked before it is written: nothing non-finite ever reaches the output
        t = b.get(name)
        if not all_finite(t):
            raise FinetuneError(f"{b.path}: {name} holds NaN or infinite values; the base checkpoint is damaged")
        target = out_dtype or t.dtype
        if name not in todo:
            res = t if t.dtype == target else buffer(t.shape, target, slot).copy_(t)
        else:
            x = buffer(t.shape, torch.float32, slot).copy_(t)  # fp32 workspace (never write into the mmap'd base)
            for kind, a, w in todo[name]:
                if kind == "full":
                    blend_full_(x, a.full[name], w)
                else:
                    A, B = a.lora[name[: -len(".weight")]]
                    add_lora_delta_(x, A, B, w * a.scaling)
            if not all_finite(x):
                raise FinetuneError(f"{out}: not written: the adapters make {name} overflow (NaN or infinite "
                                    f"values); check their weights")
            res = x if target == torch.float32 else buffer(t.shape, target, slot).copy_(x)
        if res is not t and not all_finite(res):
            raise FinetuneError(f"{out}: not written: {name} does not fit in {str(target).replace('torch.', '')} "
                                f"(values overflow to infinity); choose another --dtype")
        return res

    plan = [(k, b.shapes[k], out_dtype or b.dtypes[k]) for k in b.names]
    if fmt == "pth":
        with atomic_file(out) as tmp:
            write_pth_streaming(tmp, plan, produce, archive=archive_name(out))
    elif fmt == "safetensors":
        with atomic_file(out) as tmp:
            write_safetensors_streaming(tmp, plan, produce)
    else:
        provenance = {"written_by": "rwkv-lora merge", "format": "hf",
                      "base": {"path": str(b.path), "fingerprint": b.fingerprint},
                      "adapters": [{"path": str(a.path), "weight": w} for a, w in loaded],
                      "dtype": str(out_dtype or "as base").replace("torch.", "")}
        with atomic_dir(out) as tmp:
            if b.family.name == "rwkv7":  # transformers has no RWKV-7 of its own: rwkv7-hf's converter writes it
                from finetune.hf7 import write_rwkv7_hf_dir

                main_dtype = collections.Counter(d for k, _, d in plan if k.endswith(".weight")).most_common(1)[0][0]
                write_rwkv7_hf_dir(tmp, lambda pth: write_pth_streaming(pth, plan, produce), main_dtype,
                                   None if world else tokenizer_json, out, log)
            else:
                write_hf_dir(tmp, b, plan, produce, tokenizer_json)
            (tmp / HF_MARKER).write_text(json.dumps(provenance, indent=2) + "\n")
    summary = {"out": str(out), "format": fmt, "tensors_changed": len(todo), "tensors": len(plan),
               "dtype": str(out_dtype or "as base").replace("torch.", ""), "seconds": time.perf_counter() - t0,
               "adapters": [(str(a.path), w) for a, w in loaded]}
    return summary


# ----------------------------------------------------------------------------------------------------------------------
# Hugging Face directories


def hf_tokenizer_json(arg: str | None, adapters: Sequence, vocab_size: int,
                      log: Callable[[str], None] | None = None) -> tuple[str, bool]:
    """The tokenizer.json an HF directory gets, and whether it is World's: `arg` (world or a tokenizer.json path) if
    given, else the first adapter's (World, or the tokenizer.json it carries), else World for a World-sized
    vocabulary. An HF directory is never written without a tokenizer: a one-line FinetuneError when none is
    known."""
    text, world = None, False
    if arg is not None:
        record, data = tokenizer_record(arg)
        if record != "world" and data is None:
            raise FinetuneError(f"--tokenizer {arg}: neither world nor a tokenizer.json file")
        world, text = record == "world", data.decode("utf-8") if data is not None else None
    else:
        for a, _ in adapters:
            record = a.meta.tokenizer
            if record is None:
                continue
            world = str(record).startswith("world")
            text = None if world else adapter_tokenizer_json(a)
            if not world and text is None:
                raise FinetuneError(f"adapter {a.path}: records tokenizer {record!r} but does not carry it and no "
                                    f"such file is here; pass --tokenizer world|PATH/tokenizer.json")
            break
        else:
            if vocab_size != WORLD_VOCAB_SIZE:
                raise FinetuneError("--format hf writes a tokenizer and no adapter records one; pass --tokenizer "
                                    "world|PATH/tokenizer.json")
            world = True
            if log is not None:
                log("note: no adapter records a tokenizer; the HF directory gets the World tokenizer (the model has "
                    "World's vocabulary size)")
    if world:
        text = world_tokenizer_json(read_world_vocab(WorldTokenizer().vocab_path))
    n = tokenizer_vocab_size(text)
    if n > vocab_size:
        raise FinetuneError(f"the tokenizer has {n} tokens but the model only {vocab_size}; pass the right "
                            f"--tokenizer")
    return text, world


def write_hf_dir(tmp: Path, base: LazyBase, plan: Plan, produce: Producer, tokenizer_json: str) -> None:
    """An RwkvForCausalLM directory into `tmp`: config, weights under transformers' names, tokenizer files."""
    main_dtype = collections.Counter(d for k, _, d in plan if k.endswith(".weight")).most_common(1)[0][0]
    (tmp / "config.json").write_text(json.dumps(hf_config(base.config, main_dtype), indent=2) + "\n")
    write_safetensors_streaming(tmp / "model.safetensors", plan, produce, rename=hf_name)
    write_tokenizer_files(tmp, tokenizer_json)


# ----------------------------------------------------------------------------------------------------------------------
# RWKV-LM-LoRA interop


def _lora_key(key: str) -> tuple[str, int] | None:
    """`blocks.0.att.key.lora_A` (or `.lora_A.weight`) -> ("blocks.0.att.key", 0); B -> 1; else None."""
    k = key[: -len(".weight")] if key.endswith((".lora_A.weight", ".lora_B.weight")) else key
    for suffix, idx in ((".lora_A", 0), (".lora_B", 1)):
        if k.endswith(suffix):
            return k[: -len(suffix)], idx
    return None


def import_rwkv_lm_lora(file: str | Path, alpha: float, base: str | Path, out: str | Path,
                        tokenizer: str | None = None, force: bool = False, overwrite: bool = False
                        ) -> dict[str, Any]:
    """Convert an RWKV-LM-LoRA checkpoint into our adapter directory. Tensors under base names count as trained in
    full only when they differ from the base (files that carry the whole frozen base are fine). An existing `out` is
    replaced only with `force` or `overwrite`, and only if it is an adapter directory."""
    check_output(out, force=force or overwrite, inputs=[file, base], marker=ADAPTER_META, flag="--overwrite")
    if alpha is None or not math.isfinite(alpha) or alpha <= 0:
        raise FinetuneError(f"--alpha must be a positive finite number, got {alpha} (RWKV-LM-LoRA files do not "
                            f"record it: give the lora_alpha of the training run)")
    b = LazyBase(base)
    sd = read_state_dict(file)
    pairs: dict[str, list] = {}
    full: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        lk = _lora_key(key)
        if lk is not None:
            pairs.setdefault(lk[0], [None, None])[lk[1]] = as_float(t, key, file)
        elif key in b.shapes:
            ref = b.get(key)
            if tuple(t.shape) != tuple(ref.shape):
                raise FinetuneError(f"{file}: {key} is {tuple(t.shape)} but {tuple(ref.shape)} in {b.path}; "
                                    f"made for another base")
            t = as_float(t, key, file)
            if not torch.equal(t.to(ref.dtype), ref):
                full[key] = t
        else:
            raise FinetuneError(f"{file}: unknown tensor {key} (neither a LoRA factor nor a tensor of {b.path})")
    if not pairs and not full:
        raise FinetuneError(f"{file}: no LoRA factors and nothing that differs from the base")
    lora = check_pairs(pairs, Path(file))
    ranks = {A.shape[0] for A, _ in lora.values()}
    if len(ranks) > 1:
        raise FinetuneError(f"{file}: LoRA factors of different ranks {sorted(ranks)}; one rank per adapter")
    fam = b.family
    meta = AdapterMeta(
        family=fam.name, base=b.record(), tokenizer=tokenizer, r=ranks.pop() if ranks else 1, alpha=float(alpha),
        parts=sorted({m.split(".")[2] for m in lora if m.startswith("blocks.") and m.split(".")[2] in fam.lora_parts}),
        train=sorted(g for g, pred in fam.full_groups.items() if any(pred(n) for n in full)),
        recipe={"imported_from": str(file), "tool": "RWKV-LM-LoRA", "scaling_convention": "alpha / r"})
    check_adapter(Adapter(path=Path(file), meta=meta, lora=lora, full=full), b.shapes, b.fingerprint, family=fam,
                  force=force, base_name=str(b.path))
    write_adapter(out, meta, lora, full)
    return {"out": str(out), "r": meta.r, "alpha": alpha, "lora_pairs": len(lora), "full": len(full)}


def export_rwkv_lm_lora(adapter: str | Path, out: str | Path, force: bool = False) -> dict[str, Any]:
    """Write an adapter in RWKV-LM-LoRA's layout (`.pth`, fp32) and return the integer lora_alpha to merge it with.

    Their merge (and rwkv.cpp's merge script, which takes an integer alpha) computes W + alpha / r * B @ A with
    r = lora_B.shape[1], so the alpha to give them is scaling * r. When that is not an integer (rsLoRA, or a
    fractional alpha) it is rounded and lora_B is scaled by exact / rounded, so the merged weights stay the same;
    `notes` says so, and warns when LoRA on att.output would be lost by RWKV-LM-LoRA's --lora_load. An existing
    `out` is replaced only with `force`."""
    check_output(out, force=force, inputs=adapter_files(adapter))
    a = read_adapter(adapter)
    if a.state is not None:
        raise FinetuneError(f"adapter {adapter}: a state adapter has no LoRA weights to export")
    r = a.meta.r
    exact = a.scaling * r
    alpha = max(1, round(exact))
    factor = exact / alpha
    notes = []
    if not math.isclose(factor, 1.0, rel_tol=1e-9):
        notes.append(f"note: the adapter's alpha for an alpha / r merge is {exact:.6g}, not an integer (rwkv.cpp's "
                     f"merge script needs one): exported for lora_alpha={alpha}, with lora_B scaled by "
                     f"{factor:.6g} so that the merged weights are unchanged")
    sd: dict[str, torch.Tensor] = {}
    for module, (A, B) in sorted(a.lora.items()):
        sd[f"{module}.lora_A"] = A.contiguous()
        sd[f"{module}.lora_B"] = (B.double() * factor).float() if factor != 1.0 else B.contiguous()
    for name, t in sorted(a.full.items()):
        sd[name] = t.contiguous()
    output = [m for m in a.lora if m.endswith(".att.output")]
    if output:
        notes.append(f"warning: {len(output)} LoRA pairs adapt att.output: merging keeps them, but RWKV-LM-LoRA's "
                     f"--lora_load has no LoRA on att.output and drops them if you continue training there")
    with atomic_file(out) as tmp:
        save_pth(sd, tmp, archive=archive_name(out))
    return {"out": str(out), "alpha": alpha, "r": r, "tensors": len(sd), "notes": notes}


# ----------------------------------------------------------------------------------------------------------------------
# CLI


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge", help="merge adapters into a base checkpoint",
        description="Merge one or more adapters into a base checkpoint (RWKV-4, 5.2, 6 or 7): W + weight * scaling * "
                    "B @ A for every "
                    "adapted matrix, fully trained tensors replaced (weighted), computed in fp32 and cast once. The "
                    "output has exactly the base's keys and shapes (BlinkDL layout), streamed tensor by tensor.")
    p.add_argument("--base", required=True, help="base checkpoint (.pth or .safetensors)")
    p.add_argument("--adapter", action="append", required=True, metavar="PATH[:W]",
                   help="adapter directory or packed .safetensors, optionally with a weight (repeatable)")
    p.add_argument("--out", required=True, help="output path (.pth / .safetensors file, or a directory for hf)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="output dtype (default: the base's)")
    p.add_argument("--format", choices=FORMATS, dest="fmt",
                   help="pth (BlinkDL), safetensors, or hf (a transformers directory: RwkvForCausalLM for RWKV-4, "
                        "rwkv7-hf's conversion for RWKV-7); default from --out's suffix")
    p.add_argument("--force", action="store_true", help="merge even if an adapter was made for another base "
                                                        "(fingerprint mismatch; shapes must still fit); also "
                                                        "replaces an existing output like --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output file (or an HF directory that merge wrote; never another one)")
    p.add_argument("--tokenizer", help="hf format: the tokenizer to write (world or PATH/tokenizer.json; default: "
                                       "the one the adapters record and carry)")
    p.set_defaults(func=run_merge)

    p = sub.add_parser("pack", help="pack an adapter directory into one .safetensors file",
                       description="Write an adapter as one safetensors file (LoRA factors, fully trained tensors, and "
                                   "the metadata as JSON strings in the header) for sharing.")
    p.add_argument("adapter", help="adapter directory")
    p.add_argument("--out", required=True, help="output NAME.safetensors")
    p.add_argument("--force", "--overwrite", action="store_true", dest="force",
                   help="replace an existing output file (never one of the adapter's own files)")
    p.set_defaults(func=run_pack)

    p = sub.add_parser("import-lora", help="import an RWKV-LM-LoRA checkpoint as an adapter",
                       description="Convert an RWKV-LM-LoRA .pth (blocks.N.att.key.lora_A [r, in] / lora_B [out, r], "
                                   "plus tensors trained in full) into an rwkv-lora adapter directory. Read with "
                                   "weights_only=True.")
    p.add_argument("file", help="RWKV-LM-LoRA .pth")
    p.add_argument("--alpha", type=float, required=True, help="the lora_alpha it was trained with (not in the file)")
    p.add_argument("--base", required=True, help="the base checkpoint it was trained on")
    p.add_argument("--out", required=True, help="output adapter directory")
    p.add_argument("--tokenizer", help="tokenizer to record (world or a tokenizer.json path)")
    p.add_argument("--force", action="store_true", help="accept a file whose shapes fit the base but that was made "
                                                        "for another one; also replaces an existing output")
    p.add_argument("--overwrite", action="store_true", help="replace an existing adapter directory at --out")
    p.set_defaults(func=run_import)

    p = sub.add_parser("export-lora", help="export an adapter in RWKV-LM-LoRA's .pth layout",
                       description="Write an adapter as an RWKV-LM-LoRA style .pth (lora_A / lora_B and fully trained "
                                   "tensors under checkpoint names). Prints the alpha to give their merge script.")
    p.add_argument("adapter", help="adapter directory or packed .safetensors")
    p.add_argument("--out", required=True, help="output .pth")
    p.add_argument("--force", "--overwrite", action="store_true", dest="force",
                   help="replace an existing output file (never one of the adapter's own files)")
    p.set_defaults(func=run_export)


def run_merge(args: argparse.Namespace) -> int:
    s = merge_adapters(args.base, args.adapter, args.out, dtype=args.dtype, fmt=args.fmt, force=args.force, log=print,
                       overwrite=args.overwrite, tokenizer=args.tokenizer)
    print(f"wrote {s['out']} ({s['format']}, {s['dtype']}): {s['tensors_changed']} of {s['tensors']} tensors changed "
          f"by {len(s['adapters'])} adapter(s) in {s['seconds']:.1f}s")
    return 0


def run_pack(args: argparse.Namespace) -> int:
    out = pack_adapter(args.adapter, args.out, force=args.force)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")
    return 0


def run_import(args: argparse.Namespace) -> int:
    s = import_rwkv_lm_lora(args.file, args.alpha, args.base, args.out, tokenizer=args.tokenizer, force=args.force,
                            overwrite=args.overwrite)
    print(f"wrote {s['out']}: {s['lora_pairs']} LoRA pairs (r={s['r']}, alpha={s['alpha']:g}), "
          f"{s['full']} tensors trained in full")
    return 0


def run_export(args: argparse.Namespace) -> int:
    s = export_rwkv_lm_lora(args.adapter, args.out, force=args.force)
    for note in s["notes"]:
        print(note, file=sys.stderr)
    print(f"wrote {s['out']}: {s['tensors']} tensors; merge it with lora_alpha={s['alpha']} (r={s['r']})")
    return 0
