"""The `rwkv-lora` entry point itself: every command's module is imported (failures show), and a reader that closes
the pipe early (`rwkv-lora info x.pth | head`) ends the command quietly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from conftest import random_rwkv4_state_dict, write_checkpoint
from finetune import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_command_is_registered():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"init", "info", "prepare", "train", "merge", "pack", "generate", "chat"} <= set(sub.choices)


def test_a_command_module_that_fails_to_import_is_an_error(monkeypatch):
    # before: a missing module was skipped and its commands silently vanished from the CLI
    monkeypatch.setattr(cli, "COMMANDS", cli.COMMANDS + ["finetune.no_such_command_module"])
    with pytest.raises(ModuleNotFoundError, match="no_such_command_module"):
        cli.build_parser()


def test_closed_stdout_pipe_exits_quietly(tmp_path):
    ckpt = write_checkpoint(tmp_path / "m.pth", random_rwkv4_state_dict(1, 16, 50))
    # the reader is gone before the command writes a byte: what `info | head -0` (or a quitting pager) does
    proc = subprocess.Popen([sys.executable, "-m", "finetune.cli", "info", str(ckpt)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    rc = proc.wait(timeout=120)
    assert err == ""  # no traceback, no "Exception ignored" at interpreter exit
    assert rc == 128 + signal.SIGPIPE
