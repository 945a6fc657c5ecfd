"""The web page's test set-up: a tiny random RWKV-4 base with two tiny adapters, served by the real create_app."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from conftest import random_rwkv4_state_dict, write_checkpoint
from finetune.serve.app import create_app
from finetune.serve.config import ServeConfig
from test_merge import make_adapter

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "data" / "demo-tokenizer" / "tokenizer.json"  # the demo's 1024-token BPE: readable output
ADAPTERS = ("style-a", "style-b")


def served_model(tmp: Path) -> Path:
    """tmp/base.pth (2 x 32, vocab 1024) and tmp/style-a, tmp/style-b (LoRA adapters for it), made once per tmp."""
    base = tmp / "base.pth"
    if not base.exists():
        write_checkpoint(base, random_rwkv4_state_dict(2, 32, 1024, seed=7))
        for seed, name in enumerate(ADAPTERS, start=1):
            make_adapter(base, tmp / name, seed=seed, train=(), tokenizer=str(TOKENIZER))  # LoRA only: served per request
    return base


def make_app(tmp: Path, **over) -> FastAPI:
    """create_app over the tiny base and its two adapters; `over`: ServeConfig fields (runs_dir, allow_train, ...)."""
    base = served_model(tmp)
    config = ServeConfig(model=str(base), adapters={n: str(tmp / n) for n in ADAPTERS}, tokenizer=str(TOKENIZER),
                         dtype="fp32", **{k: (str(v) if isinstance(v, Path) else v) for k, v in over.items()})
    return create_app(config)
