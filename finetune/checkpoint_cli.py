"""`rwkv-lora init` (a random RWKV of any supported generation in BlinkDL's layout) and `rwkv-lora info` (what a
file holds)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from finetune.adapter_format import describe_adapter, is_adapter
from finetune.atomic import check_output
from finetune.errors import FinetuneError
from finetune.checkpoint import (check_keys, check_values, describe_dtypes, fingerprint, read_state_dict,
                                 save_checkpoint)
from finetune.models import ARCHES, DTYPE_NAMES, FAMILIES, detect, family_for, parse_dtype


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "init", help="write a randomly initialised RWKV checkpoint (BlinkDL layout)",
        description="Write a freshly initialised RWKV-4, 5.2, 6 or 7 checkpoint in BlinkDL's .pth layout, "
                    "initialised the way RWKV-LM does for that generation (decays spread over channels, token-shift "
                    "mixes ramped by layer, identity blocks). Useful for demos, tests and pretraining from scratch.")
    p.add_argument("--n-layer", type=int, required=True, help="number of blocks")
    p.add_argument("--n-embd", type=int, required=True, help="width of the residual stream")
    p.add_argument("--vocab", type=int, required=True, help="vocabulary size (65536 World, 50277 Pile/Raven)")
    p.add_argument("--arch", choices=list(ARCHES), default="4",
                   help="RWKV generation: 4, 5 (RWKV-5.2 Eagle), 6 (RWKV-6 Finch) or 7 (RWKV-7 Goose) (default 4)")
    p.add_argument("--head-size", type=int, default=64,
                   help="RWKV-5/6/7: head size N; --n-embd must be a multiple of it (default 64, as published)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32",
                   help="storage dtype (released models are bf16; default fp32)")
    p.add_argument("--out", required=True, help="output .pth (or .safetensors) path")
    p.add_argument("--force", "--overwrite", action="store_true", dest="force",
                   help="replace an existing file at --out")
    p.set_defaults(func=run_init)

    p = sub.add_parser(
        "info", help="describe a checkpoint or an adapter",
        description="Print what a file holds: for an RWKV checkpoint its version, layers, width, vocabulary, "
                    "parameter count, dtype and fingerprint; for an adapter its kind, rank, alpha, parts and base.")
    p.add_argument("path", help="a .pth / .safetensors checkpoint, an adapter directory or a packed adapter")
    p.set_defaults(func=run_info)


def run_init(args: argparse.Namespace) -> int:
    for name in ("n_layer", "n_embd", "vocab", "head_size"):
        if getattr(args, name) < 1:
            raise FinetuneError(f"--{name.replace('_', '-')} must be a positive integer")
    check_output(args.out, force=args.force)  # before any work: a base checkpoint is never replaced by accident
    family = FAMILIES[ARCHES[args.arch]]
    fields = {f.name for f in dataclasses.fields(family.config_class)}
    extra = {}
    if "head_size" in fields:
        if args.n_embd % args.head_size:
            raise FinetuneError(f"--n-embd {args.n_embd} must be a multiple of --head-size {args.head_size}")
        extra["head_size"] = args.head_size
    config = family.config_class(n_layer=args.n_layer, n_embd=args.n_embd, vocab_size=args.vocab, **extra)
    model = family.init(family.model_class(config), seed=args.seed)
    dtype = parse_dtype(args.dtype)
    sd = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}  # row-major, as BlinkDL's files
    save_checkpoint(sd, args.out)
    print(f"wrote {args.out}: {family_for(model).title} {config.n_layer} x {config.n_embd}, "
          f"vocab {config.vocab_size}, {model.num_params() / 1e6:.2f}M parameters, {args.dtype}")
    return 0


def describe_checkpoint(path: str | Path) -> str:
    sd = read_state_dict(path)
    family = detect(sd, path)
    cfg = family.config_from_state_dict(sd, path)
    check_keys(sd, family, cfg, path)  # what train, generate and merge would refuse, info refuses too
    check_values(sd, path)
    n = sum(v.numel() for v in sd.values())
    lines = [
        f"file:        {path}",
        f"version:     {family.title}",
        f"layers:      {cfg.n_layer}",
        *family.describe(cfg),
        f"vocab:       {cfg.vocab_size}",
        f"parameters:  {n:,} ({n / 1e6:.1f}M)",
        f"dtype:       {describe_dtypes(sd)}",
        f"fingerprint: {fingerprint(sd)}",
    ]
    return "\n".join(lines)


def run_info(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if not path.exists():
        raise FinetuneError(f"{path}: no such file or directory")
    if is_adapter(path):  # the adapter formats (directory or packed file) describe themselves
        print(describe_adapter(path))
        return 0
    if path.is_dir():
        raise FinetuneError(f"{path}: a directory that is not an rwkv-lora adapter")
    print(describe_checkpoint(path))
    return 0

