"""`rwkv-lora init` / `info` and the one-line errors for files that are not RWKV-4 checkpoints."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import torch

from conftest import random_rwkv4_state_dict, write_checkpoint
from finetune import FinetuneError, load_model
from finetune.checkpoint import read_state_dict
from finetune.cli import main


def run_cli(*args):
    """Run the real console entry point in a subprocess: exit status and stderr as a user sees them."""
    return subprocess.run([sys.executable, "-m", "finetune.cli", *map(str, args)], capture_output=True, text=True)


def test_init_writes_blinkdl_layout(tmp_path, capsys):
    out = tmp_path / "init.pth"
    assert main(["init", "--n-layer", "3", "--n-embd", "40", "--vocab", "300", "--seed", "1", "--dtype", "bf16",
                 "--out", str(out)]) == 0
    sd = read_state_dict(out)
    assert sd["blocks.2.att.time_mix_k"].shape == (1, 1, 40)
    assert sd["blocks.0.ln0.weight"].shape == (40,) and sd["head.weight"].shape == (300, 40)
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    decay = sd["blocks.0.att.time_decay"].float()
    assert decay[0] == pytest.approx(-5, abs=0.05) and decay[-1] == pytest.approx(3, abs=0.05)  # spread over channels
    # later layers mix in less of the previous token: time_mix_k ramps up with depth
    assert sd["blocks.2.att.time_mix_k"].float().mean() > sd["blocks.0.att.time_mix_k"].float().mean()
    assert sd["blocks.1.att.output.weight"].abs().sum() == 0  # blocks start as the identity
    model = load_model(out, dtype="fp32")
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]]))).all()
    # same seed, same file contents
    out2 = tmp_path / "init2.pth"
    main(["init", "--n-layer", "3", "--n-embd", "40", "--vocab", "300", "--seed", "1", "--dtype", "bf16",
          "--out", str(out2)])
    assert all(torch.equal(sd[k], v) for k, v in read_state_dict(out2).items())


def test_info_describes_a_checkpoint(tmp_path):
    path = write_checkpoint(tmp_path / "m.pth", random_rwkv4_state_dict(2, 48, 97, dtype=torch.bfloat16))
    r = run_cli("info", path)
    assert r.returncode == 0, r.stderr
    n = sum(v.numel() for v in random_rwkv4_state_dict(2, 48, 97).values())
    for expected in ("RWKV-4", "layers:      2", "width:       48", "vocab:       97", f"{n:,}", "bf16"):
        assert expected in r.stdout


def bad_files(tmp_path):
    good = write_checkpoint(tmp_path / "good.pth", random_rwkv4_state_dict(2, 32, 50))
    data = good.read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    not_rwkv = write_checkpoint(tmp_path / "resnet.pth", {"conv1.weight": torch.zeros(3, 3), "fc.bias": torch.zeros(2)})
    v5 = random_rwkv4_state_dict(1, 32, 50)
    v5["blocks.0.att.ln_x.weight"] = torch.ones(32)
    v6 = random_rwkv4_state_dict(1, 32, 50)
    v6["blocks.0.att.time_maa_x"] = torch.ones(1, 1, 32)
    v7 = random_rwkv4_state_dict(1, 32, 50)
    v7["blocks.0.att.w0"] = torch.ones(1, 1, 32)
    pickled = tmp_path / "pickled.pth"
    torch.save({"emb.weight": torch.zeros(2, 2), "note": argparse.Namespace(a=1)}, pickled)
    good_sd = random_rwkv4_state_dict(2, 32, 50)
    odd = {  # what torch.load accepts but a checkpoint cannot be: each used to end in a traceback
        "intkey": ({**good_sd, 7: torch.zeros(2)}, "a key is int 7"),
        "sparse": ({**good_sd, "emb.weight": good_sd["emb.weight"].to_sparse()}, "emb.weight is a sparse_coo tensor"),
        "meta": ({**good_sd, "head.weight": torch.empty(50, 32, device="meta")},
                 "head.weight is a strided tensor on meta"),
        "scalar": ({**good_sd, "blocks.0.ffn.key.weight": torch.tensor(1.0)}, "blocks.0.ffn.key.weight has shape ()"),
        # one stray key used to make expected_shapes list every key of a million layers first (gigabytes)
        "stray": ({**good_sd, "blocks.1000000.ln1.weight": torch.ones(32)}, "no blocks.2.* keys, yet blocks.1000000"),
        "word": ({**good_sd, "blocks.x.ln1.weight": torch.ones(32)}, "blocks.x.ln1.weight is not blocks.<number>"),
    }
    return [
        *[(write_checkpoint(tmp_path / f"{name}.pth", sd), reason) for name, (sd, reason) in odd.items()],
        (truncated, "truncated"),
        (not_rwkv, "not an RWKV checkpoint"),
        (write_checkpoint(tmp_path / "v5.pth", v5), "RWKV-5"),
        (write_checkpoint(tmp_path / "v6.pth", v6), "RWKV-6"),
        (write_checkpoint(tmp_path / "v7.pth", v7), "RWKV-7"),
        (pickled, "never unpickled"),
        (tmp_path / "missing.pth", "no such"),
    ]


def test_bad_checkpoints_give_one_line_errors(tmp_path, capsys):
    for path, reason in bad_files(tmp_path):
        with pytest.raises(FinetuneError) as e:
            load_model(path)
        assert str(path) in str(e.value) and reason in str(e.value), str(e.value)
        assert main(["info", str(path)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and reason in err and str(path) in err, err
    # and once through the real console entry point: exit status 1, one line, no traceback
    r = run_cli("info", tmp_path / "truncated.pth")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    # a legacy pickle (protocol 4): torch warns about the protocol on stderr; the error line alone is shown
    import pickle

    with open(tmp_path / "pickled.pth", "wb") as f:
        pickle.dump({"a": 1}, f, protocol=4)
    r = run_cli("info", tmp_path / "pickled.pth")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "pickled.pth" in r.stderr, r.stderr


def test_a_shape_mismatch_names_the_key(tmp_path):
    sd = random_rwkv4_state_dict(2, 32, 50)
    sd["blocks.1.ffn.value.weight"] = torch.zeros(32, 100)
    with pytest.raises(FinetuneError, match=r"blocks\.1\.ffn\.value\.weight has shape"):
        load_model(write_checkpoint(tmp_path / "m.pth", sd))


def test_init_refuses_an_existing_file(tmp_path, capsys):
    out = tmp_path / "base.pth"
    out.write_bytes(b"a base checkpoint")
    args = ["init", "--n-layer", "1", "--n-embd", "8", "--vocab", "16", "--out", str(out)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--force" in err and str(out) in err, err
    assert out.read_bytes() == b"a base checkpoint"
    assert main([*args, "--force"]) == 0
    assert read_state_dict(out)["emb.weight"].shape == (16, 8)


def test_non_float_and_non_finite_checkpoints_are_refused_everywhere(tmp_path, capsys, small_tokenizer):
    """int8 (quantized) and NaN/inf checkpoints: info, generate, train and merge refuse them in one line."""
    from test_lora import make_corpus, pattern_tokens
    from test_merge import make_adapter

    good = write_checkpoint(tmp_path / "good.pth", random_rwkv4_state_dict(2, 32, 97, seed=1))
    adapter = make_adapter(good, tmp_path / "adapter", seed=1)
    data = make_corpus(tmp_path / "train", pattern_tokens())
    sd = random_rwkv4_state_dict(2, 32, 97, seed=1)
    quantized = write_checkpoint(tmp_path / "int8.pth", {
        k: (v * 100).to(torch.int8) if v.dim() == 2 else v for k, v in sd.items()})
    nan = dict(sd)
    nan["blocks.1.att.value.weight"] = nan["blocks.1.att.value.weight"].clone()
    nan["blocks.1.att.value.weight"][3, 4] = float("nan")
    inf = dict(sd)
    inf["ln_out.bias"] = torch.full_like(sd["ln_out.bias"], float("inf"))
    cases = [(quantized, "is int8; only float checkpoints"),
             (write_checkpoint(tmp_path / "nan.pth", nan), "blocks.1.att.value.weight holds NaN or infinite"),
             (write_checkpoint(tmp_path / "inf.bf16.pth", {k: v.bfloat16() for k, v in inf.items()}),
              "ln_out.bias holds NaN or infinite")]
    for path, reason in cases:
        commands = [
            ["info", path],
            ["generate", "--model", path, "--prompt", "a", "--tokenizer", small_tokenizer, "--max-tokens", "2"],
            ["train", "--model", path, "--data", data, "--out_dir", tmp_path / "run", "--ctx_len", "16",
             "--max_steps", "1"],
            ["merge", "--base", path, "--adapter", adapter, "--out", tmp_path / "m.pth", "--force"],
        ]
        for args in commands:
            assert main([*map(str, args)]) == 1, args
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and reason in err and str(path) in err, (args, err)
        assert not (tmp_path / "m.pth").exists() and not (tmp_path / "run" / "final").exists()
