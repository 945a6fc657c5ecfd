"""`rwkv-lora`: the command line. One subcommand per job; each module that owns a job registers its own parser.

A module listed in COMMANDS provides `add_parser(subparsers)`, which adds its subcommand(s) and sets `func` (a
callable taking the parsed args) as the default. Any `FinetuneError` becomes one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

from finetune.errors import FinetuneError, Terminated, raise_terminated

# modules that register subcommands, in the order --help lists them
COMMANDS = [
    "finetune.checkpoint_cli",  # init, info
    "finetune.prepare",  # prepare
    "finetune.train.command",  # train
    "finetune.merge",  # merge, pack, import-lora, export-lora
    "finetune.generate",  # generate, chat
    "finetune.state_files",  # export-state, import-state
    "finetune.serve.command",  # serve
]

# what a shell reports for a program killed by SIGPIPE (`yes | head`): the reader went away, nothing is wrong
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rwkv-lora",
        description="LoRA fine-tuning for RWKV language models: RWKV-4, 5.2, 6 and 7 (BlinkDL .pth checkpoints).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        # no try/except: a command whose module fails to import must fail loudly, not vanish from --help
        importlib.import_module(name).add_parser(sub)
    return parser


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush of what is still buffered does not raise a
    second BrokenPipeError ("Exception ignored ... BrokenPipeError") on the way out."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout without a file descriptor (captured by a caller): nothing to flush
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra  # `train` takes --key value config overrides
    # SIGTERM's default action kills at once and leaves every temporary file behind: unwind as on Ctrl-C instead
    # (train and serve install their own handlers for their runs, and restore this one)
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        result = args.func(args)
        # output still in the buffer meets a closed pipe here, inside the handler below, not at interpreter exit
        sys.stdout.flush()
    except Terminated:
        # every command that writes a file names it with --out; the others (generate, chat, info) stream to stdout
        kept = "; no partial output was kept" if getattr(args, "out", None) is not None else ""
        print(f"rwkv-lora {args.command}: terminated (SIGTERM){kept}", file=sys.stderr)
        return 128 + signal.SIGTERM
    except BrokenPipeError:
        # `rwkv-lora info x.pth | head`: the reader has all it wanted; stop quietly, as well-behaved tools do
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except FinetuneError as e:
        print(f"rwkv-lora {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"rwkv-lora {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
