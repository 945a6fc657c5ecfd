"""The `train` subcommand: `rwkv-lora train --config RECIPE [--key value ...]` (and `python train.py ...`).

Kept light on purpose: `rwkv-lora --help` and every other subcommand import this module, and PyTorch Lightning
takes seconds to import, so `finetune.train.main` is imported only when a run starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import yaml

from finetune.atomic import check_inputs_outside
from finetune.train.config import LoRASettings, TrainConfig, field_docs, load_config, parse_overrides
from finetune.train.distributed import env_rank_zero
from finetune.train.signals import RunStopped

HELP = """\
Fine-tune an RWKV (4, 5.2, 6 or 7) with LoRA (or in full). Settings come from a YAML recipe and/or --key value overrides
(dotted for the lora section: --lora.r 16; values are YAML scalars: --lora.parts [att,ffn]).

examples:
  rwkv-lora train --config recipes/demo.yaml
  rwkv-lora train --config recipes/novel.yaml --model base.pth --data out/novel.json --lora.r 16
  rwkv-lora train --config recipes/novel.yaml --model base.pth --data out/novel.json --lora.r 16 --resume true
                 # continue a stopped run from out_dir/last.ckpt: the run's settings again, plus --resume true

SIGTERM or Ctrl+C stops a run at the next step with a resumable last.ckpt (exit status 143 / 130).
"""


def keys_help() -> str:
    lines = ["config keys (default):"]
    defaults = {**field_defaults(TrainConfig), **{f"lora.{k}": v for k, v in field_defaults(LoRASettings).items()}}
    for k, doc in field_docs(TrainConfig).items():
        if k != "lora":
            lines.append(f"  {k:16s} {doc} ({defaults[k]})")
    for k, doc in field_docs(LoRASettings).items():
        lines.append(f"  lora.{k:11s} {doc} ({defaults['lora.' + k]})")
    return "\n".join(lines)


def field_defaults(cls: type) -> dict[str, str]:
    """Field name -> its default as a recipe would write it (YAML: null, true, [att, ffn])."""
    out = {}
    for f in dataclasses.fields(cls):
        value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(value):  # a section (lora): its keys are listed one by one
            continue
        out[f.name] = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    return out


def run_cli(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(HELP + "\n" + keys_help())
        return 0
    cfg = load_config(None, argv)
    check_inputs_outside(Path(cfg.out_dir), {"config": parse_overrides(argv)[0]})  # the recipe file, if any
    from finetune.train.main import main  # Lightning: seconds to import, so only when a run starts

    try:
        main(cfg)
    except RunStopped as e:
        if env_rank_zero():
            print(f"rwkv-lora train: {e}", file=sys.stderr)
        return e.exit_status  # 143 / 130: a `train && merge` pipeline stops here
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("train", help="fine-tune with LoRA (or in full) from a YAML recipe",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False)
    p.add_argument("-h", "--help", action="store_true", help="show the config keys")
    p.set_defaults(func=lambda args: run_cli((["--help"] if args.help else []) + list(args.overrides)),
                   accepts_overrides=True)
