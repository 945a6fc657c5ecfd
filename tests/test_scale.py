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

from finetune.models import RNNState

from conftest import random_rwkv4_state_dict, write_checkpoint
from finetune.adapter_format import read_adapter
from finetune.errors import FinetuneError
from finetune.train.config import load_config
from finetune.train.distributed import lightning_strategy, strategy_spec
from finetune.train.main import main, setup
from test_lora import VOCAB, config, make_corpus, pattern_tokens, setup_dir  # noqa: F401
from train_helpers import apply_adapter, fake_deepspeed, shard, simulate_zero3, unshard

ROOT = Path(__file__).resolve().parent.parent


def adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


def assert_same_adapter(a: Path, b: Path, rtol=1e-5):
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert ta.keys() == tb.keys() and ta
    for k in ta:
        scale = ta[k].abs().max().clamp(min=1e-6)
        assert ((ta[k] - tb[k]).abs().max() / scale) <= rtol, k


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


# ----------------------------------------------------------------------------------------------------------------------
# DeepSpeed: the configs map onto Lightning's strategy arguments; clear errors without deepspeed or CUDA


@pytest.mark.parametrize("name, kind, kwargs", [
    ("auto", "auto", {}), ("ddp", "ddp", {}),
    ("deepspeed_stage_2", "deepspeed", {"stage": 2}),
    ("deepspeed_stage_2_offload", "deepspeed", {"stage": 2, "offload_optimizer": True}),
    ("deepspeed_stage_3", "deepspeed", {"stage": 3}),
    ("deepspeed_stage_3_offload", "deepspeed", {"stage": 3, "offload_optimizer": True, "offload_parameters": True}),
])
def test_strategy_configs_map_to_lightning(name, kind, kwargs):
    cfg = load_config(None, {"strategy": name, "num_nodes": 2})
    assert cfg.num_nodes == 2 and strategy_spec(cfg.strategy) == (kind, kwargs)
    if kind != "deepspeed":
        assert lightning_strategy(cfg) == kind
        return
    with pytest.raises(FinetuneError, match=r"needs DeepSpeed \(pip install"):
        lightning_strategy(cfg, have_deepspeed=False)
    with pytest.raises(FinetuneError, match="needs CUDA GPUs"):
        lightning_strategy(cfg, have_deepspeed=True, cuda_available=False)


def test_strategy_recipes_and_bad_names():
    with pytest.raises(FinetuneError, match="strategy: 'fsdp' is not one of"):
        load_config(None, {"strategy": "fsdp"})
    recipes = sorted((ROOT / "recipes" / "strategies").glob("*.yaml"))
    assert {r.stem for r in recipes} >= {"ddp", "deepspeed-stage2", "deepspeed-stage2-offload", "deepspeed-stage3"}
    for r in recipes:
        assert r.read_text().startswith("#") and f"--config recipes/strategies/{r.name}" in r.read_text()
        cfg = load_config(r)
        assert cfg.strategy != "auto" and cfg.model and cfg.data


def test_setup_refuses_deepspeed_without_cuda(setup_dir):
    tmp, ckpt, data, _ = setup_dir
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(FinetuneError, match="strategy: deepspeed_stage_3 needs"):
        setup(config(tmp, ckpt, data, strategy="deepspeed_stage_3"), quiet=True)


def test_zero3_gathered_save_equals_unsharded(setup_dir, monkeypatch):
    """Trained tensors split into per-rank flat shards (ZeRO-3's layout, data emptied) are gathered before saving
    (through deepspeed.zero.GatheredParameters, here a stand-in: DeepSpeed needs CUDA): the adapter equals the one
    saved from whole tensors and loads with read_adapter and peft."""
    from peft import PeftModel

    from finetune import load_model

    monkeypatch.setitem(sys.modules, "deepspeed", fake_deepspeed())
    t = torch.arange(10.0).reshape(2, 5)
    parts = shard(t, 3)
    assert [p.numel() for p in parts] == [4, 4, 4] and torch.equal(unshard(parts, (2, 5)), t)

    tmp, ckpt, data, _ = setup_dir
    run = setup(config(tmp, ckpt, data, **{"lora.train": ["time"]}), quiet=True)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in run.model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    whole = run.save_weights("whole")
    trained = [p for p in run.model.parameters() if p.requires_grad]
    simulate_zero3(trained, world=3)
    assert all(p.numel() == 0 for p in trained)
    sharded = run.save_weights("sharded")
    assert all(p.numel() == 0 for p in trained)  # re-partitioned afterwards
    assert_same_adapter(whole, sharded, rtol=0)
    a, b = read_adapter(whole), read_adapter(sharded)
    assert a.full.keys() == b.full.keys() and all(torch.equal(a.full[k], b.full[k]) for k in a.full)
    assert len(b.lora) == len(a.lora) > 0
    peft_model = PeftModel.from_pretrained(load_model(ckpt), str(sharded))
    ids = torch.tensor([[1, 2, 3, 4]])
    plugged = load_model(ckpt, adapters=[sharded])
    with torch.no_grad():
        torch.testing.assert_close(apply_adapter(load_model(ckpt), sharded)(ids), plugged(ids))
        assert peft_model(ids).shape == (1, 4, VOCAB)


# ----------------------------------------------------------------------------------------------------------------------
# infctx and state tuning in the trainer


def test_infctx_trainer_loss_equals_window(tmp_path):
    ckpt = write_checkpoint(tmp_path / "tiny.pth", random_rwkv4_state_dict(2, 32, VOCAB, seed=1))
    data = make_corpus(tmp_path / "train", pattern_tokens(200))
    results = {}
    for mode in ("window", "infctx"):
        cfg = config(tmp_path, ckpt, data, train_type=mode, chunk_len=512, ctx_len=2048, micro_bsz=1, max_steps=2,
                     out_dir=str(tmp_path / mode), logger="none", **{"lora.train": ["time"]})
        results[mode] = main(cfg, quiet=True)
    for step in (1, 2):
        assert results["infctx"]["losses"][step] == pytest.approx(results["window"]["losses"][step], rel=1e-5)
    assert_same_adapter(tmp_path / "window" / "final", tmp_path / "infctx" / "final", rtol=1e-4)


def test_state_tuning_trains_saves_and_plugs_into_generation(tmp_path, capsys):
    from finetune import load_model
    from finetune.adapter_format import pack_adapter
    from finetune.cli import main as cli
    from finetune.generate import generate_tokens

    ckpt = write_checkpoint(tmp_path / "tiny.pth", random_rwkv4_state_dict(2, 32, VOCAB, seed=1))
    data = make_corpus(tmp_path / "train", pattern_tokens())
    cfg = config(tmp_path, ckpt, data, train_type="state", lr=0.2, lr_final=0.2, max_steps=30, ctx_len=8,
                 micro_bsz=4, logger="none")
    res = main(cfg, quiet=True)
    losses = [res["losses"][s] for s in sorted(res["losses"])]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses[::5]
    final = Path(res["final"])
    assert sorted(p.name for p in final.iterdir()) == ["rwkv_lora.json", "state.safetensors"]
    meta = json.loads((final / "rwkv_lora.json").read_text())
    assert meta["kind"] == "state" and meta["base"]["fingerprint"] and meta["tokenizer"] == "test-tokenizer"
    assert meta["recipe"]["train_type"] == "state"
    tensors = load_file(str(final / "state.safetensors"))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {"att_shift": (2, 32), "wkv": (2, 3, 32),
                                                               "ffn_shift": (2, 32)}
    state = RNNState(**tensors)
    assert meta["family"] == "rwkv4"
    # the base is untouched; the state plugs in as model.initial_state
    sd = torch.load(ckpt, weights_only=True)
    model = load_model(ckpt, adapters=[final])
    for k in RNNState.FIELDS:
        assert torch.equal(getattr(model.initial_state, k), getattr(state, k)), k
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    prompt = [5, 7, 11]
    got = [t for t, _ in generate_tokens(model, prompt, max_tokens=8, temperature=0.0, stop_token=None)]
    plain = load_model(ckpt)
    s = state.expand(1)
    want = []
    with torch.no_grad():
        for tok in prompt:
            logits, s = plain.step(torch.tensor([tok]), s)
        for _ in range(8):
            want.append(int(logits[0].argmax()))
            logits, s = plain.step(torch.tensor([want[-1]]), s)
    assert got == want
    # packed, described, refused by merge
    packed = pack_adapter(final, tmp_path / "state.safetensors")
    for k in RNNState.FIELDS:
        assert torch.equal(getattr(read_adapter(packed).state, k), getattr(state, k)), k
    assert cli(["info", str(final)]) == 0
    out = capsys.readouterr().out
    assert "state adapter" in out and "2 layers: token shifts of 32, WKV 3 x 32" in out
    assert cli(["merge", "--base", str(ckpt), "--adapter", str(final), "--out", str(tmp_path / "m.pth")]) == 1
    assert "cannot be merged" in capsys.readouterr().err
    with pytest.raises(FinetuneError, match="another base"):
        load_model(write_checkpoint(tmp_path / "wide.pth", random_rwkv4_state_dict(2, 48, VOCAB)), adapters=[final])
