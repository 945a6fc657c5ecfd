"""The trainer (finetune.train): the training loop on tiny models and tiny corpora."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import random_rwkv4_state_dict, write_checkpoint
from finetune.binidx import BinidxWriter
from finetune.data import WindowDataset, open_corpus
from finetune.errors import FinetuneError
from finetune.train import loss as train_loss
from finetune.train.config import load_config
from finetune.train.loss import lm_loss
from finetune.train.main import fit, main, setup
from train_helpers import KilledForTest, StopAfter, apply_adapter

VOCAB = 97


def make_corpus(prefix: Path, tokens, vocab: int = VOCAB, tokenizer: str = "test-tokenizer", mask=None) -> Path:
    """binidx data + a manifest in `rwkv-lora prepare`'s layout; returns the manifest path."""
    w = BinidxWriter(str(prefix), np.uint16)
    w.add_document(np.asarray(tokens))
    w.close()
    mask_prefix = None
    if mask is not None:
        m = BinidxWriter(f"{prefix}.mask", np.uint8)
        m.add_document(np.asarray(mask, dtype=np.uint8))
        m.close()
        mask_prefix = prefix.name + ".mask"
    manifest = {"format": "rwkv-lora-data", "version": 1, "documents": 1, "tokens": len(tokens),
                "tokenizer": tokenizer, "vocab_size": vocab, "eod_id": 0, "dtype": "uint16", "template": "none",
                "shards": [{"prefix": prefix.name, "mask_prefix": mask_prefix, "documents": 1, "tokens": len(tokens)}],
                "has_mask": mask is not None}
    path = prefix.with_name(prefix.name + ".json")
    path.write_text(json.dumps(manifest))
    return path


def pattern_tokens(n_repeats: int = 150, seed: int = 0) -> np.ndarray:
    return np.tile(np.random.default_rng(seed).integers(1, VOCAB, 23), n_repeats)


@pytest.fixture
def setup_dir(tmp_path):
    ckpt = write_checkpoint(tmp_path / "tiny.pth", random_rwkv4_state_dict(2, 32, VOCAB, seed=1))
    data = make_corpus(tmp_path / "train", pattern_tokens())
    val = make_corpus(tmp_path / "val", pattern_tokens(20, seed=0))
    return tmp_path, ckpt, data, val


def config(tmp_path, ckpt, data, **over):
    values = {"model": str(ckpt), "data": str(data), "out_dir": str(tmp_path / "run"), "ctx_len": 16,
              "micro_bsz": 4, "max_steps": 6, "lr": 1e-2, "lr_final": 1e-3, "precision": "32", "seed": 3,
              "logger": "csv", "lora.r": 4, "lora.alpha": 8}
    values.update(over)
    return load_config(None, {k: v for k, v in values.items()})


def test_loss_falls_and_outputs(setup_dir):
    tmp, ckpt, data, val = setup_dir
    cfg = config(tmp, ckpt, data, max_steps=25, val_data=str(val), val_every=25, warmup_steps=2)
    res = main(cfg, quiet=True)
    losses = [res["losses"][s] for s in sorted(res["losses"])]
    assert len(losses) == 25
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert first - last > 1.0, (first, last)
    assert res["val_loss"] < res["val_loss_start"] - 1.0
    out = Path(cfg.out_dir)
    for f in ("final/rwkv_lora.json", "final/adapter_model.safetensors", "metrics.csv", "loss.png", "config.json"):
        assert (out / f).is_file(), f
    meta = json.loads((out / "final/rwkv_lora.json").read_text())
    assert meta["base"]["n_layer"] == 2 and meta["base"]["vocab_size"] == VOCAB and meta["base"]["fingerprint"]
    assert meta["tokenizer"] == "test-tokenizer" and meta["r"] == 4 and meta["alpha"] == 8
    assert meta["recipe"]["max_steps"] == 25 and meta["parts"] == ["att", "ffn"]
    assert meta["template"] == "none"  # the data manifest's (make_corpus: plain text), for chat and serve
    header = (out / "metrics.csv").read_text().splitlines()[0]
    assert "train_loss" in header and "val_loss" in header


def test_only_chosen_parameters_train_and_base_is_untouched(setup_dir):
    tmp, ckpt, data, _ = setup_dir
    cfg = config(tmp, ckpt, data, **{"lora.parts": ["att"], "lora.train": ["ln"]})
    run = setup(cfg, quiet=True)
    batch = torch.utils.data.default_collate([run.train_data[i] for i in range(2)])
    loss = lm_loss(run.model(batch["input_ids"]), batch["targets"], batch["loss_mask"])
    loss.backward()
    for name, p in run.model.named_parameters():
        chosen = ("lora_" in name and ".att." in name) or any(f".{ln}." in name or name.endswith(f"{ln}.weight")
                                                               or name.endswith(f"{ln}.bias")
                                                               for ln in ("ln0", "ln1", "ln2", "ln_out"))
        assert p.requires_grad == chosen, name
        assert (p.grad is not None) == chosen, name

    sd = torch.load(ckpt, weights_only=True)
    cfg = config(tmp, ckpt, data, max_steps=3, out_dir=str(tmp / "run2"))
    run = setup(cfg, quiet=True)
    fit(run)
    base = {k.replace(".base_layer", ""): v for k, v in run.base.state_dict().items() if "lora_" not in k}
    assert set(base) == set(sd)
    for k, v in sd.items():
        assert torch.equal(base[k], v), k
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in run.model.named_parameters() if "lora_B" in n)


def test_masked_targets_do_not_reach_the_loss():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 8, VOCAB, generator=g, requires_grad=True)
    targets = torch.randint(0, VOCAB, (2, 8), generator=g)
    mask = torch.ones(2, 8)
    mask[0, :5] = 0
    mask[1, 3] = 0
    loss = lm_loss(logits, targets, mask)
    (grad,) = torch.autograd.grad(loss, logits)
    changed = targets.clone()
    changed[0, :5] = (changed[0, :5] + 1) % VOCAB
    changed[1, 3] = (changed[1, 3] + 7) % VOCAB
    loss2 = lm_loss(logits, changed, mask)
    (grad2,) = torch.autograd.grad(loss2, logits)
    assert torch.equal(loss, loss2) and torch.equal(grad, grad2)
    assert grad[0, :5].abs().sum() == 0
    # an all-masked batch gives zero, not nan
    assert lm_loss(logits, targets, torch.zeros(2, 8)).item() == 0.0


def test_mask_file_reaches_the_batches(tmp_path):
    tokens = pattern_tokens(10)
    mask = np.zeros(tokens.size, dtype=np.uint8)
    mask[::2] = 1
    corpus = open_corpus(str(make_corpus(tmp_path / "m", tokens, mask=mask)))
    ds = WindowDataset(corpus, 16, schedule="random", seed=0)
    item = ds[0]
    assert item["loss_mask"].shape == (16,) and 0 < item["loss_mask"].sum() < 16
    assert torch.equal(item["input_ids"][1:], item["targets"][:-1])


def test_resume_gives_the_same_losses(setup_dir):
    # with LoRA dropout: the resumed run must draw the masks the unbroken run drew (torch's generator is saved)
    tmp, ckpt, data, _ = setup_dir
    drop = {"lora.dropout": 0.1}
    full = main(config(tmp, ckpt, data, out_dir=str(tmp / "full"), save_every=2, **drop), quiet=True)["losses"]
    cfg = config(tmp, ckpt, data, out_dir=str(tmp / "killed"), save_every=2, **drop)
    with pytest.raises(KilledForTest):
        main(cfg, quiet=True, callbacks=[StopAfter(5)])  # killed after step 5: the last checkpoint is step 4
    assert (tmp / "killed" / "last.ckpt").is_file() and (tmp / "killed" / "step-4").is_dir()
    resumed = main(config(tmp, ckpt, data, out_dir=str(tmp / "killed"), save_every=2, resume=True, **drop),
                   quiet=True)["losses"]
    assert sorted(resumed) == [5, 6]
    for s in (5, 6):
        assert resumed[s] == full[s], (s, resumed[s], full[s])
    a = torch.load(tmp / "full" / "last.ckpt", weights_only=True)
    assert all(".lora_" in k or "time" in k or "ln" in k for k in a["state_dict"])  # no frozen base inside


def test_adapter_loads_with_peft_and_gives_the_same_logits(setup_dir):
    from peft import PeftModel

    from finetune.adapter_format import read_adapter
    from finetune import load_model

    tmp, ckpt, data, _ = setup_dir
    cfg = config(tmp, ckpt, data, max_steps=4, **{"lora.train": ["time"]})
    final = main(cfg, quiet=True)["final"]
    idx = torch.randint(1, VOCAB, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        plugged = apply_adapter(load_model(ckpt), final)(idx)
        # peft's own loader, then the fully trained tensors by hand
        peft_model = PeftModel.from_pretrained(load_model(ckpt), final).eval()
        a = read_adapter(final)
        assert a.full and all("time" in k for k in a.full)
        for k, v in a.full.items():
            peft_model.get_base_model().get_parameter(k).copy_(v)
        logits_peft = peft_model(idx)
        # and independently: W + scaling * B @ A written into a plain model
        merged = load_model(ckpt)
        for module, _ in a.lora.items():
            merged.get_submodule(module).weight += a.delta(module)
        for k, v in a.full.items():
            merged.get_parameter(k).copy_(v)
        logits_merged = merged(idx)
    assert torch.equal(plugged, logits_peft)
    torch.testing.assert_close(logits_peft, logits_merged, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits_merged, load_model(ckpt)(idx), atol=1e-4)


def test_full_finetune_saves_a_checkpoint(setup_dir):
    from finetune import load_model

    tmp, ckpt, data, _ = setup_dir
    res = main(config(tmp, ckpt, data, method="full", max_steps=2, lr=1e-3), quiet=True)
    model = load_model(res["final"])
    assert model.config.n_layer == 2
    assert not torch.equal(model.head.weight, torch.load(ckpt, weights_only=True)["head.weight"])


# ---- bad input: one-line errors before training -------------------------------------------------------------------


def test_missing_checkpoint(setup_dir):
    tmp, _, data, _ = setup_dir
    with pytest.raises(FinetuneError, match="nope.pth: no such checkpoint file"):
        setup(config(tmp, tmp / "nope.pth", data), quiet=True)


def test_fp16_mixed_on_the_cpu_is_refused_in_one_line(setup_dir):
    """torch's CPU autocast in fp16 stops inside the first block (torch.cat on fp16 tensors): refused before the
    model is loaded, naming the setting."""
    tmp, ckpt, data, _ = setup_dir
    with pytest.raises(FinetuneError, match="precision: 16-mixed is for GPUs"):
        setup(config(tmp, ckpt, data, precision="16-mixed", accelerator="cpu"), quiet=True)


def test_token_ids_beyond_the_vocab(setup_dir):
    tmp, ckpt, _, _ = setup_dir
    data = make_corpus(tmp / "big", np.arange(200) % 150, vocab=150)
    with pytest.raises(FinetuneError, match=r"big.json: token id 149 >= the model's vocab_size 97"):
        setup(config(tmp, ckpt, data), quiet=True)


def test_tokenizer_other_than_the_data_was_made_with(setup_dir):
    tmp, ckpt, data, _ = setup_dir
    with pytest.raises(FinetuneError, match=r"prepared with tokenizer 'test-tokenizer', but tokenizer is 'world'"):
        setup(config(tmp, ckpt, data, tokenizer="world"), quiet=True)


def test_data_shorter_than_one_window(setup_dir):
    tmp, ckpt, _, _ = setup_dir
    data = make_corpus(tmp / "short", np.arange(1, 11))
    with pytest.raises(FinetuneError, match=r"short.json: 10 tokens, fewer than one window of ctx_len \+ 1 = 17"):
        setup(config(tmp, ckpt, data), quiet=True)


def test_resume_without_checkpoint_and_reused_out_dir(setup_dir):
    tmp, ckpt, data, _ = setup_dir
    with pytest.raises(FinetuneError, match="nothing to resume"):
        setup(config(tmp, ckpt, data, resume=True), quiet=True)
    (tmp / "run").mkdir()
    (tmp / "run" / "last.ckpt").write_bytes(b"x")
    with pytest.raises(FinetuneError, match="holds a run already"):
        setup(config(tmp, ckpt, data), quiet=True)


def test_cli_reports_one_line(setup_dir, capsys):
    from finetune.cli import main as cli

    tmp, ckpt, data, _ = setup_dir
    assert cli(["train", "--model", str(ckpt), "--data", str(data), "--lora.rank", "4"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown config key 'lora.rank'" in err and "lora.r," in err
    assert cli(["train", "--model", str(tmp / "missing.pth"), "--data", str(data)]) == 1
    assert "missing.pth: no such checkpoint file" in capsys.readouterr().err


def test_nan_loss_stops_and_keeps_the_last_good_adapter(setup_dir, monkeypatch):
    tmp, ckpt, data, _ = setup_dir
    real = train_loss.window_totals
    calls = {"n": 0}

    def flaky(*args):
        calls["n"] += 1
        total, count = real(*args)
        return (total * float("nan") if calls["n"] == 3 else total), count

    monkeypatch.setattr(train_loss, "window_totals", flaky)
    with pytest.raises(FinetuneError, match=r"loss is nan at step 3.*step 2\) are in .*step-2"):
        main(config(tmp, ckpt, data), quiet=True)
    assert (tmp / "run" / "step-2" / "rwkv_lora.json").is_file()
    assert not (tmp / "run" / "final").exists()
