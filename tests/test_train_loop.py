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
from torch.utils._python_dispatch import TorchDispatchMode

from finetune.adapter_format import read_adapter
from finetune.errors import FinetuneError
from finetune.infctx import rwkv_core
from finetune.train.main import main, setup
from finetune.train.optim import lr_factor
from conftest import write_checkpoint
from test_lora import VOCAB, config, make_corpus, pattern_tokens, setup_dir  # noqa: F401

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


@pytest.mark.parametrize("over, fused, foreach", [
    ({"precision": "32"}, True, None),
    ({"precision": "bf16-mixed", "grad_clip": None}, True, None),
    # Lightning refuses gradient clipping under mixed precision for an optimizer that could unscale by itself
    ({"precision": "bf16-mixed", "grad_clip": 1.0}, False, True),
    ({"precision": "bf16-mixed", "strategy": "deepspeed_stage_2"}, False, None),  # DeepSpeed steps it itself
])
def test_adamw_runs_fused_where_lightning_takes_it(over, fused, foreach):
    from finetune.train.config import TrainConfig
    from finetune.train.optim import build_optimizer

    params = [torch.nn.Parameter(torch.ones(3, 2)), torch.nn.Parameter(torch.ones(2))]
    opt, _ = build_optimizer(params, TrainConfig(**over))
    assert isinstance(opt, torch.optim.AdamW)
    assert bool(opt.defaults["fused"]) == fused and opt.defaults["foreach"] == foreach
    params[0].grad, params[1].grad = torch.full((3, 2), 0.5), torch.full((2,), -0.5)
    opt.step()  # the first AdamW step moves each weight by lr against its gradient's sign (bias-corrected moments)
    torch.testing.assert_close(params[0].data, torch.full((3, 2), 1 - 1e-4), rtol=1e-6, atol=0)
    torch.testing.assert_close(params[1].data, torch.full((2,), 1 + 1e-4), rtol=1e-6, atol=0)


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


def reference_adamw(p0: torch.Tensor, grads: list[torch.Tensor], lr: float, betas: tuple[float, float], eps: float,
                    weight_decay: float) -> torch.Tensor:
    """AdamW from its definition (Loshchilov & Hutter, torch's form), in float64."""
    p, m, v = p0.double().clone(), torch.zeros_like(p0, dtype=torch.float64), torch.zeros_like(p0, dtype=torch.float64)
    for k, g in enumerate(grads, start=1):
        g = g.double()
        p *= 1 - lr * weight_decay
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        p -= lr * (m / (1 - betas[0] ** k)) / ((v / (1 - betas[1] ** k)).sqrt() + eps)
    return p


def test_adamw8bit_moves_weights_like_adamw_and_holds_8bit_moments():
    """optimizer adamw8bit (bitsandbytes): after 6 steps on a LoRA-sized matrix each weight's total move is AdamW's
    (from its definition, float64) within the 8-bit moments' rounding, and the moments are held in one byte each."""
    from finetune.train.config import TrainConfig
    from finetune.train.optim import build_optimizer

    g = torch.Generator().manual_seed(0)
    p0 = torch.randn(64, 256, generator=g)
    grads = [torch.randn(64, 256, generator=g) * (1 + k) for k in range(6)]
    cfg = TrainConfig(lr=1e-2, lr_final=1e-2, schedule="constant", optimizer="adamw8bit", weight_decay=0.1)
    param = torch.nn.Parameter(p0.clone())
    opt, _ = build_optimizer([param], cfg)
    for grad in grads:
        param.grad = grad.clone()
        opt.step()
    expected = reference_adamw(p0, grads, cfg.lr, tuple(cfg.betas), cfg.eps, cfg.weight_decay)
    moved, want = (param.detach().double() - p0.double()), expected - p0.double()
    # measured over four seeds: 0.8% in norm, 2-6% at the worst weight (fp32 torch.optim.AdamW: 4e-6 and 1.5e-5)
    assert float((moved - want).norm() / want.norm()) < 0.015
    assert float((moved - want).abs().max()) < 0.1 * float(want.abs().max())
    moments = [t for t in opt.state[param].values() if torch.is_tensor(t) and t.numel() == param.numel()]
    assert len(moments) == 2 and all(t.dtype == torch.uint8 for t in moments)


def test_adamw8bit_run_trains_and_resumes_exactly(tmp_path):
    """A LoRA run with optimizer adamw8bit lowers the loss, and a run killed after step 3 and resumed from its
    last.ckpt (the 8-bit moments saved and read back) gives the same losses as one that was never stopped. C = 128,
    r = 32: the LoRA matrices have 4096 values, the size bitsandbytes starts holding moments in 8 bits at."""
    from conftest import random_rwkv4_state_dict, write_checkpoint
    from train_helpers import KilledForTest, StopAfter

    ckpt = write_checkpoint(tmp_path / "c128.pth", random_rwkv4_state_dict(2, 128, 97, seed=1))
    data = make_corpus(tmp_path / "train", pattern_tokens())
    over = {"optimizer": "adamw8bit", "lora.r": 32, "lora.alpha": 32, "max_steps": 8, "save_every": 3,
            "lr": 3e-3, "lr_final": 3e-3}
    full = main(config(tmp_path, ckpt, data, out_dir=str(tmp_path / "full"), **over), quiet=True)["losses"]
    assert np.mean([full[s] for s in (6, 7, 8)]) < np.mean([full[s] for s in (1, 2, 3)]) - 0.5, full
    with pytest.raises(KilledForTest):
        main(config(tmp_path, ckpt, data, out_dir=str(tmp_path / "killed"), **over), quiet=True,
             callbacks=[StopAfter(4)])
    state = torch.load(tmp_path / "killed" / "last.ckpt", weights_only=True)["optimizer_states"][0]["state"]

    def tensors(x):
        return [x] if torch.is_tensor(x) else [t for v in x.values() for t in tensors(v)] if isinstance(x, dict) else []
    assert any(t.dtype == torch.uint8 and t.numel() >= 4096 for t in tensors(state))
    resumed = main(config(tmp_path, ckpt, data, out_dir=str(tmp_path / "killed"), resume=True, **over),
                   quiet=True)["losses"]
    assert sorted(resumed) == [4, 5, 6, 7, 8]
    for s in resumed:
        assert resumed[s] == full[s], (s, resumed[s], full[s])


class DeviceReads(TorchDispatchMode):
    """Counts reads of a tensor's value by the host (`.item()`, `.tolist()`, `bool(t)`): on a GPU each one waits
    for the work queued so far."""

    READS = ("aten._local_scalar_dense.default", "aten.is_nonzero.default")

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.reads += str(func) in self.READS
        return func(*args, **(kwargs or {}))


def test_a_step_reads_its_losses_and_gradient_check_once_after_the_backward_passes(setup_dir):
    """training_step queues the forward pass without reading the loss (a read would make a GPU finish the forward
    pass before the backward pass is queued); check_step, before the optimizer step, reads every micro-batch's loss
    and whether the gradients are finite together, and finds a NaN loss (with its micro-batch) or a NaN gradient."""
    from finetune.train.module import LitRWKV

    tmp, ckpt, data, _ = setup_dir
    run = setup(config(tmp, ckpt, data, grad_accum=3), quiet=True)
    lit = LitRWKV(run.model, run.cfg)
    batches = [{k: v.unsqueeze(0) for k, v in run.train_data[i].items()} for i in range(3)]
    losses = []
    with DeviceReads() as mode:
        for b in batches:
            loss = lit.training_step(b, 0)
            loss.backward()
            losses.append(loss.detach())
    assert mode.reads == 0
    assert lit.check_step() is True
    counts = [b["loss_mask"].sum().item() for b in batches]
    assert lit.step_losses == [(x.item(), c) for x, c in zip(losses, counts)]
    assert lit.nonfinite_loss is None and not lit.pending

    lit.step_losses = []
    for i, b in enumerate(batches):
        loss = lit.training_step(b, 0)
        (loss * (float("nan") if i == 1 else 1.0)).backward()
        if i == 1:  # what training_step queued for this micro-batch, made non-finite as a broken forward would
            lit.pending[-1] = (lit.pending[-1][0] * float("nan"), lit.pending[-1][1], b)
    assert lit.check_step() is False  # the NaN reached the gradients
    assert math.isnan(lit.nonfinite_loss) and lit.bad_batch is batches[1] and len(lit.step_losses) == 2


def step_grads(run, batch) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss of `batch` and the gradients of every trained tensor (then cleared)."""
    from finetune.train.loss import batch_loss

    loss = batch_loss(run.model, batch, run.cfg)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in run.model.named_parameters() if p.requires_grad}
    run.model.zero_grad(set_to_none=True)
    return loss.item(), grads


def test_compiled_blocks_give_the_eager_loss_and_gradients(tmp_path, monkeypatch):
    """compile: true compiles every block, and the compiled blocks compute the eager loss and LoRA / full-tensor
    gradients, with gradient checkpointing on and off; the blocks after the first share one compiled graph (a 4-layer
    model compiles no more graphs than a 2-layer one: nothing specialises on the layer). Compiled with torch's
    `aot_eager` backend (dynamo's capture, the graph breaks around the WKV extension, AOTAutograd's backward: what
    this code is responsible for) instead of inductor, whose code generation takes ~70 s a run on 2 cores; the
    inductor runs are in bench/train_rwkv7.py (same first loss as eager)."""
    from torch._dynamo.utils import counters

    from rwkv7_helpers import random_rwkv7_state_dict

    compiled_blocks = []
    plain_compile = torch.nn.Module.compile

    def compile_for_test(module, *args, **kwargs):
        compiled_blocks.append(module)
        plain_compile(module, *args, **{**kwargs, "backend": "aot_eager"})

    monkeypatch.setattr(torch.nn.Module, "compile", compile_for_test)
    data = make_corpus(tmp_path / "train", pattern_tokens())
    graphs = {}
    for n_layer, checkpointing in ((2, False), (3, False), (3, True)):
        ckpt = write_checkpoint(tmp_path / f"v7-{n_layer}.pth", random_rwkv7_state_dict(n_layer, 64, VOCAB, 32, seed=2))
        runs = {}
        for compiled in (False, True):
            torch._dynamo.reset()
            counters.clear()
            compiled_blocks.clear()
            cfg = config(tmp_path, ckpt, data, compile=compiled, grad_checkpoint=checkpointing,
                         **{"lora.parts": ["att", "ffn"], "lora.train": ["time"]})
            run = setup(cfg, quiet=True)
            assert compiled_blocks == (list(rwkv_core(run.model).blocks) if compiled else [])
            batch = {k: torch.stack([run.train_data[i][k] for i in range(2)]) for k in run.train_data[0]}
            runs[compiled] = step_grads(run, batch)
            if compiled and not checkpointing:
                graphs[n_layer] = counters["stats"]["unique_graphs"]
        (loss, grads), (loss_c, grads_c) = runs[False], runs[True]
        assert loss_c == pytest.approx(loss, rel=1e-6)
        assert grads.keys() == grads_c.keys() and any("lora_A" in n for n in grads)
        for n in grads:
            torch.testing.assert_close(grads_c[n], grads[n], rtol=1e-5, atol=1e-7, msg=n)
    assert 0 < graphs[3] == graphs[2]  # block 2 runs block 1's graph


def _small_model(arch: str) -> torch.nn.Module:
    """A 2 x 128 model of one generation with RWKV-LM's init plus noise on every matrix (the init's zero output
    projections would make every block the identity)."""
    from finetune.models import ARCHES, FAMILIES

    family = FAMILIES[ARCHES[arch]]
    extra = {} if arch == "4" else {"head_size": 64}
    model = family.init(family.model_class(family.config_class(n_layer=2, n_embd=128, vocab_size=300, **extra)),
                        seed=1)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


@pytest.mark.parametrize("arch", ["4", "5", "6", "7"])
@pytest.mark.parametrize("groups", [["time"], ["ln"], ["emb"], ["head"], ["time", "ln", "emb", "head"]])
def test_bf16_mixed_trains_each_full_group_next_to_a_bf16_base(arch, groups):
    """bf16-mixed holds the base in bf16 and the trained tensors in fp32 (main._build_model): a trained mix, norm,
    embedding or head then meets bf16 activations. Every family and group must give the fp32 model's loss (LoRA's B
    starts at zero) and finite fp32 gradients for every trained tensor. (RWKV-7 and RWKV-5 with `time`, and every
    family with `emb` alone, stopped on a dtype error in lerp / the CPU's layer_norm before as_dtype.)"""
    import copy

    from finetune.train.config import TrainConfig
    from finetune.train.loss import batch_loss
    from finetune.train.main import _build_model, base_precision_dtype

    ref_model = _small_model(arch)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": ids, "targets": torch.roll(ids, -1, 1), "loss_mask": torch.ones(2, 24)}
    cfg = TrainConfig(precision="bf16-mixed")
    cfg.lora.train = groups
    with torch.no_grad():
        ref = batch_loss(ref_model, batch, cfg).item()  # fp32, no autocast

    base = copy.deepcopy(ref_model).cast(base_precision_dtype(cfg.precision))
    model, _, _ = _build_model(cfg, base)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = batch_loss(model, batch, cfg)
    loss.backward()
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    full = [n for n in trained if "lora_" not in n]
    assert full, "no tensor of the groups is trained"
    # bf16 activations: measured |difference| < 0.001 nats at a loss of ~6
    assert abs(loss.item() - ref) < 0.01, (loss.item(), ref)
    for n, p in trained.items():
        assert p.dtype == torch.float32 and p.grad is not None and torch.isfinite(p.grad).all(), n
    assert any(trained[n].grad.abs().sum() > 0 for n in full)


RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))  # the strategies/ overlays add no model settings


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_trains_a_step_on_a_small_model_of_its_generation(recipe, tmp_path):
    """Each shipped recipe's own settings (precision, method, train_type, trained groups, gradient checkpointing, the
    base's dtype) through `setup` and one forward and backward pass as Lightning runs it (autocast for the mixed
    precisions), on a 2 x 128 model of the generation the recipe is for; only paths, sizes and the logger are
    overridden. rwkv7-novel.yaml (bf16-mixed with `train: [time]`) stopped at its first step before as_dtype."""
    from finetune.checkpoint import save_checkpoint
    from finetune.train.config import load_config
    from finetune.train.loss import batch_loss
    from finetune.train.main import base_precision_dtype

    arch = "7" if recipe.stem.startswith("rwkv7") else "6" if recipe.stem.startswith("rwkv6") else "4"
    ckpt = save_checkpoint(_small_model(arch), tmp_path / "base.pth")
    data = make_corpus(tmp_path / "train", np.arange(1, 300).repeat(3), vocab=300)
    cfg = load_config(recipe, {"model": str(ckpt), "data": str(data), "val_data": None, "val_every": 0,
                               "tokenizer": None, "out_dir": str(tmp_path / "run"), "logger": "none",
                               "ctx_len": 24, "chunk_len": 8, "micro_bsz": 2})
    run = setup(cfg, quiet=True)
    batch = next(iter(torch.utils.data.DataLoader(run.train_data, batch_size=2)))
    dtype = base_precision_dtype(cfg.precision)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        loss = batch_loss(run.model, batch, cfg)
    loss.backward()
    trained = [p for p in run.model.parameters() if p.requires_grad]
    assert torch.isfinite(loss) and trained
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained)
    assert any(p.grad.abs().sum() > 0 for p in trained)
