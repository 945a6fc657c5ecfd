"""Beyond one device and one window: DDP on the CPU, DeepSpeed strategy configs and the ZeRO-3 gather, infctx and
state tuning in the trainer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import random_rwkv4_state_dict, write_checkpoint
from finetune import lora
from finetune.adapters import read_adapter
from finetune.config import load_config
from finetune.errors import FinetuneError
from test_lora import VOCAB, config, make_corpus, pattern_tokens, setup_dir  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent


def adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


def assert_same_adapter(a: Path, b: Path, rtol=1e-5):
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert ta.keys() == tb.keys() and ta
    for k in ta:
        scale = ta[k].abs().max().clamp(min=1e-6)
        assert ((ta[k] - tb[k]).abs().max() / scale) < rtol, k


def test_ddp_two_processes_equal_one_with_grad_accum(setup_dir):
    """strategy ddp, 2 CPU processes (gloo), micro_bsz 2 each == one process, micro_bsz 2 x grad_accum 2."""
    tmp, ckpt, data, _ = setup_dir
    common = {"model": str(ckpt), "data": str(data), "ctx_len": 16, "micro_bsz": 2, "max_steps": 3, "lr": 1e-2,
              "lr_final": 1e-3, "precision": "32", "seed": 3, "logger": "none", "accelerator": "cpu",
              "lora": {"r": 4, "alpha": 8, "train": ["ln"]}}
    runs = {"ddp": dict(common, strategy="ddp", devices=2, grad_accum=1, out_dir=str(tmp / "ddp")),
            "one": dict(common, strategy="auto", devices=1, grad_accum=2, out_dir=str(tmp / "one"))}
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for name, values in runs.items():
        recipe = tmp / f"{name}.yaml"
        recipe.write_text(yaml.safe_dump(values))
        out = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(recipe)], env=env, cwd=tmp,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
    assert_same_adapter(tmp / "ddp" / "final", tmp / "one" / "final")
    full_a = load_file(str(tmp / "ddp" / "final" / "trained_tensors.safetensors"))
    full_b = load_file(str(tmp / "one" / "final" / "trained_tensors.safetensors"))
    for k in full_a:
        torch.testing.assert_close(full_a[k], full_b[k], rtol=1e-5, atol=1e-6)
    assert not any(torch.equal(v, torch.zeros_like(v)) for k, v in adapter_tensors(tmp / "ddp" / "final").items()
                   if "lora_B" in k)  # it trained
