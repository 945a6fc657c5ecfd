"""What the training loop does to the numbers: the LR schedule, weight decay, gradient clipping, the non-finite
gradient guard. Expected values are computed here from the definitions, not from the trainer's code."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from finetune.adapter_format import read_adapter
from finetune.errors import FinetuneError
from finetune.train.main import main, setup
from finetune.train.optim import lr_factor
from test_lora import config, make_corpus, pattern_tokens, setup_dir  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent


def expected_lr(k: int, lr: float, lr_final: float, warmup: int, n: int, schedule: str) -> float:
    """The rate of optimizer step k (1-based), from its definition: a linear ramp over the first `warmup` steps that
    trains from step 1 (lr * k / warmup), then lr for constant, or a cosine / straight line from lr at the first
    step after warmup to lr_final at the last step."""
    if k <= warmup:
        return lr * k / warmup
    if schedule == "constant":
        return lr
    first, last = warmup + 1, n
    t = (k - first) / max(last - first, 1)  # a single step after warmup runs at lr
    if schedule == "linear":
        return lr + (lr_final - lr) * t
    return lr_final + (lr - lr_final) * (1 + math.cos(math.pi * t)) / 2


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup, n", [(0, 10), (3, 10), (4, 5), (2, 2), (0, 1)])
def test_schedule_matches_its_closed_form(schedule, warmup, n):
    from finetune.train.config import load_config

    cfg = load_config(None, {"schedule": schedule, "lr": 2e-3, "lr_final": 2e-5, "warmup_steps": warmup,
                             "max_steps": n})
    got = [cfg.lr * lr_factor(cfg, k - 1) for k in range(1, n + 1)]
    want = [expected_lr(k, 2e-3, 2e-5, warmup, n, schedule) for k in range(1, n + 1)]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert got[0] > 0  # warmup trains from the first step
    if schedule != "constant" and n > warmup + 1:
        assert got[warmup] == pytest.approx(2e-3) and got[-1] == pytest.approx(2e-5)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedule_in_metrics_csv(setup_dir, schedule):
    """The rate the optimizer actually used at each step, as metrics.csv records it."""
    tmp, ckpt, data, _ = setup_dir
    cfg = config(tmp, ckpt, data, schedule=schedule, warmup_steps=2, max_steps=6, lr=1e-2, lr_final=1e-3,
                 ctx_len=8, micro_bsz=1, out_dir=str(tmp / schedule))
    main(cfg, quiet=True)
    with open(tmp / schedule / "metrics.csv", newline="") as f:
        lrs = {int(r["step"]): float(r["lr"]) for r in csv.DictReader(f) if r["lr"]}
    assert sorted(lrs) == [1, 2, 3, 4, 5, 6]
    for k, value in lrs.items():
        assert value == pytest.approx(expected_lr(k, 1e-2, 1e-3, 2, 6, schedule), rel=1e-9), k


def test_weight_decay_only_on_matrices(tmp_path):
    """With every target masked out the gradients are exactly zero, so one AdamW step only applies the decoupled
    weight decay, p <- p * (1 - lr * weight_decay): LoRA A, emb and head shrink by exactly that; decays, bonuses,
    mixes and layer norms do not move."""
    from conftest import random_rwkv4_state_dict, write_checkpoint

    ckpt = write_checkpoint(tmp_path / "tiny.pth", random_rwkv4_state_dict(2, 32, 97, seed=1))
    tokens = pattern_tokens()
    data = make_corpus(tmp_path / "masked", tokens, mask=np.zeros(tokens.size, dtype=np.uint8))
    over = dict(max_steps=1, lr=1e-2, weight_decay=0.1, schedule="constant", grad_clip=None,
                **{"lora.train": ["time", "ln", "emb", "head"]})
    start = {n: p.detach().clone() for n, p in setup(config(tmp_path, ckpt, data, **over), quiet=True)
             .model.named_parameters() if p.requires_grad}
    adapter = read_adapter(main(config(tmp_path, ckpt, data, **over), quiet=True)["final"])
    shrink = 1 - 1e-2 * 0.1
    after = dict(adapter.full)
    for module, (a, b) in adapter.lora.items():
        after[f"{module}.lora_A"], after[f"{module}.lora_B"] = a, b
    checked = set()
    for name, p0 in start.items():
        key = name.removeprefix("base_model.model.").replace(".lora_A.default.weight", ".lora_A") \
            .replace(".lora_B.default.weight", ".lora_B")
        decayed = ".lora_A" in key or ".lora_B" in key or key in ("emb.weight", "head.weight")
        want = p0 * shrink if decayed else p0
        torch.testing.assert_close(after[key], want.reshape(after[key].shape), rtol=1e-6, atol=0, msg=key)
        if decayed and p0.abs().max() > 0:
            assert not torch.equal(after[key], p0.reshape(after[key].shape)), key
        checked.add("decay" if decayed else "no decay")
    assert checked == {"decay", "no decay"} and any("time_decay" in n for n in start)


class GradRecorder(pl.Callback):
    """The gradients before clipping (on_before_optimizer_step comes before Lightning clips) and after it, as the
    update used them (a step post-hook, registered on the first step: Lightning runs the forward and backward passes
    inside the optimizer's step, so a pre-hook would come before them; the trainer frees them after the step)."""

    def __init__(self) -> None:
        self.before: list[list[torch.Tensor]] = []
        self.after: list[list[torch.Tensor]] = []
        self.hooked = False

    @staticmethod
    def grads(pl_module) -> list[torch.Tensor]:
        return [p.grad.detach().double().clone() for p in pl_module.parameters() if p.grad is not None]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.before.append(self.grads(pl_module))
        if not self.hooked:
            optimizer.register_step_post_hook(lambda opt, args, kwargs: self.after.append(self.grads(pl_module)))
            self.hooked = True


def total_norm(grads: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float((g * g).sum()) for g in grads))


@pytest.mark.parametrize("clip", [0.05, None])
def test_gradient_clipping_bounds_the_norm(setup_dir, clip):
    tmp, ckpt, data, _ = setup_dir
    rec = GradRecorder()
    main(config(tmp, ckpt, data, max_steps=3, grad_clip=clip, **{"lora.train": ["ln"]}), quiet=True, callbacks=[rec])
    assert len(rec.before) == len(rec.after) == 3
    for before, after in zip(rec.before, rec.after):
        norm = total_norm(before)
        if clip is None:
            scale = 1.0
        else:
            assert norm > clip  # the test clips for real
            scale = clip / (norm + 1e-6)  # torch's clip_grad_norm_
            assert total_norm(after) <= clip * (1 + 1e-6)
        for b, a in zip(before, after):
            torch.testing.assert_close(a, b * scale, rtol=1e-5, atol=1e-12)


class NaNGradientAtStep(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step + 1 == self.step:
            p = next(p for p in pl_module.parameters() if p.grad is not None)
            p.grad.view(-1)[0] = float("nan")


def test_non_finite_gradient_stops_and_keeps_the_last_good_adapter(setup_dir):
    tmp, ckpt, data, _ = setup_dir
    over = dict(schedule="constant", **{"lora.train": ["time"]})
    with pytest.raises(FinetuneError, match=r"training stopped: non-finite gradient at step 3; the last good weights "
                                            r"\(step 2\) are in .*run/step-2\. To avoid it: lower lr or set "
                                            r"grad_clip$"):
        main(config(tmp, ckpt, data, **over), quiet=True, callbacks=[NaNGradientAtStep(3)])
    out = tmp / "run"
    assert not (out / "final").exists() and not (out / "last.ckpt").exists()
    # what was kept is exactly two clean steps
    clean = read_adapter(main(config(tmp, ckpt, data, out_dir=str(tmp / "clean"), max_steps=2, **over),
                              quiet=True)["final"])
    kept = read_adapter(out / "step-2")
    assert kept.lora.keys() == clean.lora.keys() and kept.full.keys() == clean.full.keys()
    for m in clean.lora:
        for x, y in zip(kept.lora[m], clean.lora[m]):
            assert torch.equal(x, y), m
    for k in clean.full:
        assert torch.equal(kept.full[k], clean.full[k]), k
    assert all(torch.isfinite(t).all() for pair in kept.lora.values() for t in pair)


def test_the_cli_does_not_import_lightning_until_a_run_starts():
    code = ("import sys; from finetune.cli import build_parser; build_parser(); "
            "print('pytorch_lightning' in sys.modules, 'peft' in sys.modules, 'finetune.train.main' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.stdout.split() == ["False", "False", "False"], out.stderr[-2000:]
