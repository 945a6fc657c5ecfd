"""`rwkv-lora`: the command line. One subcommand per job; each module that owns a job registers its own parser.

A module listed in COMMANDS provides `add_parser(subparsers)`, which adds its subcommand(s) and sets `func` (a
callable taking the parsed args) as the default. Any `FinetuneError` becomes one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from finetune.errors import FinetuneError

# modules that register subcommands, in the order --help lists them
COMMANDS = [
    "finetune.checkpoint_cli",  # init, info
    "finetune.prepare",  # prepare
    "finetune.lora",  # train
    "finetune.merge",  # merge, pack, import-lora, export-lora
    "finetune.generate",  # generate, chat
    "finetune.state_files",  # export-state, import-state
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rwkv-lora",
        description="LoRA fine-tuning for RWKV-4 language models (BlinkDL .pth checkpoints).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:  # a broken import inside the module is a real error
                raise
            continue  # a registered module not present in this checkout (branches land separately)
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra  # `train` takes --key value config overrides
    try:
        result = args.func(args)
    except FinetuneError as e:
        print(f"rwkv-lora {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"rwkv-lora {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
