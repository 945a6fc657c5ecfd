"""Merging adapters, packed adapters, RWKV-LM-LoRA interop and bad input, against the `rwkv` package and transformers."""

from __future__ import annotations

import dataclasses
import json
import struct
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import random_rwkv4_state_dict, write_checkpoint
from finetune import cli
from finetune.adapter_format import AdapterMeta, pack_adapter, read_adapter, write_adapter
from finetune.adapters import add_lora, save_adapter
from finetune.checkpoint import fingerprint
from finetune.models.rwkv4 import config_from_state_dict
from finetune.merge import merge_adapters
from finetune import load_model
from finetune.errors import FinetuneError

ROOT = Path(__file__).resolve().parent.parent
SHAPE = (2, 64, 128)  # n_layer, n_embd, vocab


def make_adapter(base_path: Path, out_dir: Path, seed: int, r: int = 4, alpha: float = 8, parts=("att", "ffn"),
                 train=("time", "ln"), tokenizer=None) -> Path:
    """A trained-looking adapter: peft LoRA with random A and B (B nonzero) and perturbed full tensors."""
    from finetune.checkpoint import read_state_dict

    sd = read_state_dict(base_path)
    model = load_model(base_path, dtype="fp32")
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # peft draws A's initial values from the global generator: make them the seed's
        peft_model = add_lora(model, r=r, alpha=alpha, parts=parts, train=train)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * (0.2 if "lora_" in name else 0.05))
    cfg = config_from_state_dict(sd)
    meta = {"base": {"fingerprint": fingerprint(sd), "n_layer": cfg.n_layer, "n_embd": cfg.n_embd,
                     "vocab_size": cfg.vocab_size, "dim_ffn": cfg.dim_ffn, "path": str(base_path)},
            "tokenizer": tokenizer, "r": r, "alpha": alpha, "dropout": 0.0, "parts": list(parts),
            "train": list(train), "recipe": {"test": True}}
    return save_adapter(peft_model, out_dir, meta)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("merge")
    base = write_checkpoint(d / "base.pth", random_rwkv4_state_dict(*SHAPE, seed=11))
    tok = make_char_tokenizer(d / "a1-tokenizer.json")
    a1 = make_adapter(base, d / "a1", seed=1, tokenizer=str(tok))
    a2 = make_adapter(base, d / "a2", seed=2, r=2, alpha=4, parts=("att",), train=("ln",))  # records no tokenizer
    return d, base, a1, a2


def rwkv_package_logits(path, tokens):
    from rwkv.model import RWKV as BlinkRWKV

    model = BlinkRWKV(str(path), strategy="cpu fp32", verbose=False)
    logits, _ = model.forward(list(tokens), None, full_output=True)
    return logits.float()


TOKENS = torch.randint(0, SHAPE[2], (24,), generator=torch.Generator().manual_seed(5)).tolist()


def plugged_logits(base, adapters, dtype="fp32"):
    model = load_model(base, adapters=adapters, dtype=dtype)
    with torch.no_grad():
        return model(torch.tensor([TOKENS]))[0].float()


def no_temp_files(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if p.name.startswith(".")]


def test_merged_pth_loads_in_rwkv_package_and_equals_plugged_adapter(env):
    d, base, a1, _ = env
    out = d / "merged.pth"
    merge_adapters(base, [a1], out)
    merged = torch.load(out, weights_only=True)
    base_sd = torch.load(base, weights_only=True)
    assert list(merged) == list(base_sd)
    assert all(merged[k].shape == base_sd[k].shape and merged[k].dtype == base_sd[k].dtype for k in base_sd)
    ref = rwkv_package_logits(out, TOKENS)
    torch.testing.assert_close(plugged_logits(base, [a1]), ref, rtol=0, atol=1e-4)
    # the adapter did change the model
    assert (rwkv_package_logits(base, TOKENS) - ref).abs().max() > 1e-2
    assert no_temp_files(d)


def test_bf16_base(env):
    """A bf16 base merges to bf16(W + (alpha / r) B @ A) and bf16(T) (computed here in float64) and the file gives
    the `rwkv` package's logits.

    The merged file is not the plugged-in model: that one keeps the deltas and the decays in fp32, the file rounds
    every merged tensor to bf16 (time_decay included, which feeds exp(-exp(.))). The two differ by ~1% of the logits
    and more for some adapters, so they are not compared; merge and plug-in are compared exactly in fp32 above."""
    d, _, a1, _ = env
    sd16 = random_rwkv4_state_dict(*SHAPE, seed=11, dtype=torch.bfloat16)
    base16 = write_checkpoint(d / "base-bf16.pth", sd16)
    out = d / "merged-bf16.pth"
    merge_adapters(base16, [a1], out)  # a1 was made on the fp32 copy: same fingerprint (bf16-rounded)
    merged = torch.load(out, weights_only=True)
    A1 = read_adapter(a1)
    for key, W in sd16.items():
        module = key.removesuffix(".weight")
        expect = W.double()
        if key in A1.full:
            expect = A1.full[key].double()
        if module in A1.lora:
            A, B = A1.lora[module]
            expect = expect + (8 / 4) * (B.double() @ A.double())  # a1: r=4, alpha=8
        assert merged[key].dtype == torch.bfloat16, key
        # computed in fp32 then rounded once: within one bf16 step of the float64 value rounded to bf16
        step = expect.abs().clamp(min=torch.finfo(torch.bfloat16).tiny) * 2 ** -7
        assert ((merged[key].double() - expect).abs() <= step).all(), key
    # the package rounds ln0(emb) to the stored dtype when it loads a bf16 file; an fp32 copy of the same values
    # gives it exactly the merged model (see test_model.py)
    copy32 = write_checkpoint(d / "merged-bf16-as-fp32.pth", {k: v.float() for k, v in merged.items()})
    ref = rwkv_package_logits(copy32, TOKENS)
    with torch.no_grad():
        ours = load_model(out, dtype="fp32")(torch.tensor([TOKENS]))[0]
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)


def test_fingerprint_of_bf16_copy_matches(env):
    d, base, a1, _ = env
    sd = torch.load(base, weights_only=True)
    assert fingerprint(sd) == fingerprint({k: v.bfloat16() for k, v in sd.items()})


def test_two_adapters_weighted_sum_of_deltas(env):
    """W + sum_i w_i (alpha_i / r_i) B_i @ A_i, with alpha / r from how the adapters were made (not what they
    record), in float64."""
    d, base, a1, a2 = env
    out = d / "two.pth"
    merge_adapters(base, [f"{a1}:0.5", (a2, 0.25)], out)
    merged = torch.load(out, weights_only=True)
    base_sd = torch.load(base, weights_only=True)
    A1, A2 = read_adapter(a1), read_adapter(a2)
    for key, W in base_sd.items():
        expect = W.double()
        for ad, w, scaling in ((A1, 0.5, 8 / 4), (A2, 0.25, 4 / 2)):  # a1: r=4, alpha=8; a2: r=2, alpha=4
            if key in ad.full:
                expect = expect + w * (ad.full[key].double() - expect)
            module = key.removesuffix(".weight")
            if module in ad.lora:
                A, B = ad.lora[module]
                expect = expect + w * scaling * (B.double() @ A.double())
        torch.testing.assert_close(merged[key].double(), expect, rtol=0, atol=2e-6, msg=key)
    # and the same adapters plugged in with the same weights give the same logits
    ref = rwkv_package_logits(out, TOKENS)
    torch.testing.assert_close(plugged_logits(base, [(a1, 0.5), f"{a2}:0.25"]), ref, rtol=0, atol=1e-4)


def test_safetensors_and_dtype(env):
    from safetensors.torch import load_file

    d, base, a1, _ = env
    merge_adapters(base, [a1], d / "m16.pth", dtype="fp16")
    merge_adapters(base, [a1], d / "m16.safetensors", dtype="fp16")
    pth = torch.load(d / "m16.pth", weights_only=True)
    st = load_file(str(d / "m16.safetensors"))
    assert list(st) == list(pth) or sorted(st) == sorted(pth)
    for k in pth:
        assert pth[k].dtype == torch.float16 and torch.equal(st[k], pth[k])


def make_char_tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models

    chars = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:?!\n'"))
    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.decoder = decoders.Fuse()
    tok.save(str(path))
    return path


def test_hf_format_loads_in_transformers(env):
    from transformers import RwkvForCausalLM

    d, base, _, _ = env
    tok = make_char_tokenizer(d / "tokenizer.json")
    a3 = make_adapter(base, d / "a3", seed=3, tokenizer=str(tok))
    merge_adapters(base, [a3], d / "m3.pth")
    merge_adapters(base, [a3], d / "hf", fmt="hf")
    assert (d / "hf" / "config.json").is_file() and (d / "hf" / "tokenizer.json").is_file()
    assert json.loads((d / "hf" / "config.json").read_text())["rescale_every"] == 0
    hf = RwkvForCausalLM.from_pretrained(str(d / "hf")).eval()
    with torch.no_grad():
        hf_logits = hf(torch.tensor([TOKENS])).logits[0].float()
    torch.testing.assert_close(hf_logits, rwkv_package_logits(d / "m3.pth", TOKENS), rtol=0, atol=1e-4)


def test_packed_file_equals_directory(env, capsys):
    d, base, a1, _ = env
    packed = pack_adapter(a1, d / "a1.safetensors")
    A, P = read_adapter(a1), read_adapter(packed)
    assert P.meta == A.meta and P.scaling == A.scaling
    assert sorted(P.lora) == sorted(A.lora) and sorted(P.full) == sorted(A.full)
    for m in A.lora:
        assert torch.equal(P.lora[m][0], A.lora[m][0]) and torch.equal(P.lora[m][1], A.lora[m][1])
    for k in A.full:
        assert torch.equal(P.full[k], A.full[k])
    merge_adapters(base, [packed], d / "mp.pth")
    merge_adapters(base, [a1], d / "md.pth")
    x, y = torch.load(d / "mp.pth", weights_only=True), torch.load(d / "md.pth", weights_only=True)
    assert all(torch.equal(x[k], y[k]) for k in x)
    torch.testing.assert_close(plugged_logits(base, [packed]), plugged_logits(base, [a1]), rtol=0, atol=0)
    # header metadata: JSON strings
    from safetensors import safe_open

    with safe_open(str(packed), framework="pt") as f:
        md = f.metadata()
    assert json.loads(md["r"]) == 4 and json.loads(md["alpha"]) == 8
    assert json.loads(md["base"])["fingerprint"] == A.meta.base["fingerprint"]
    assert cli.main(["info", str(packed)]) == 0
    assert "packed file" in capsys.readouterr().out


def test_rwkv_lm_lora_import_export(env, capsys):
    d, base, a1, _ = env
    A = read_adapter(a1)
    alpha = 8  # a1 was made with r=4, alpha=8
    # an RWKV-LM-LoRA style file: lora_A [r, in] / lora_B [out, r], the full tensors, and the frozen base in bf16-free
    # fp32 as well (some of their checkpoints carry it)
    theirs = dict(torch.load(base, weights_only=True))
    for m, (a, b) in A.lora.items():
        theirs[f"{m}.lora_A"] = a.bfloat16().float()
        theirs[f"{m}.lora_B"] = b.bfloat16().float()
    theirs.update(A.full)
    torch.save(theirs, d / "theirs.pth")
    assert cli.main(["import-lora", str(d / "theirs.pth"), "--alpha", str(alpha), "--base", str(base),
                     "--out", str(d / "imported")]) == 0
    I = read_adapter(d / "imported")
    assert I.scaling == A.scaling == 8 / 4 and sorted(I.full) == sorted(A.full) and sorted(I.lora) == sorted(A.lora)
    # the same adapter in our format (with the same bf16-rounded factors) merges to the same weights
    rounded = d / "a1-rounded"
    write_adapter(rounded, A.meta, {m: (a.bfloat16().float(), b.bfloat16().float())
                                         for m, (a, b) in A.lora.items()}, A.full)
    merge_adapters(base, [d / "imported"], d / "mi.pth")
    merge_adapters(base, [rounded], d / "mr.pth")
    x, y = torch.load(d / "mi.pth", weights_only=True), torch.load(d / "mr.pth", weights_only=True)
    for k in x:
        torch.testing.assert_close(x[k], y[k], rtol=0, atol=1e-6)
    # export: their layout, merged their way (W + alpha / r * B @ A with r = B.shape[1]) == our merge
    capsys.readouterr()
    assert cli.main(["export-lora", str(a1), "--out", str(d / "exported.pth")]) == 0
    assert "lora_alpha=8" in capsys.readouterr().out
    ex = torch.load(d / "exported.pth", weights_only=True)
    W = torch.load(base, weights_only=True)
    ours = torch.load(d / "md.pth", weights_only=True) if (d / "md.pth").exists() else None
    if ours is None:
        merge_adapters(base, [a1], d / "md.pth")
        ours = torch.load(d / "md.pth", weights_only=True)
    for k, w in W.items():
        m = k.removesuffix(".weight")
        expect = ex[k] if k in ex else w
        if f"{m}.lora_A" in ex:
            a, b = ex[f"{m}.lora_A"], ex[f"{m}.lora_B"]
            expect = w + b @ a * (8 / b.shape[1])
        torch.testing.assert_close(ours[k], expect, rtol=0, atol=1e-6)


def test_merge_script_entry_point(env):
    d, base, a1, _ = env
    out = d / "script.pth"
    r = subprocess.run([sys.executable, str(ROOT / "merge.py"), "--base", str(base), "--adapter", str(a1), "--out",
                        str(out)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert out.is_file()


# ----------------------------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit 1, no output (and no temp file) left behind


def _corrupt(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _bad_cases(d: Path, base: Path, a1: Path):
    import shutil

    from safetensors.torch import load_file, save_file

    cases = {}
    other = write_checkpoint(d / "other.pth", random_rwkv4_state_dict(*SHAPE, seed=99))
    cases["other base"] = (["--base", other, "--adapter", a1], "made for another base")
    wide = write_checkpoint(d / "wide.pth", random_rwkv4_state_dict(2, 32, 128, seed=1))
    cases["shape mismatch"] = (["--base", wide, "--adapter", a1, "--force"], "made for another base")
    bad = d / "bad-trunc"
    shutil.copytree(a1, bad, dirs_exist_ok=True)
    _corrupt(bad / "adapter_model.safetensors")
    cases["truncated adapter"] = (["--base", base, "--adapter", bad], "corrupted or truncated")
    packed = pack_adapter(a1, d / "trunc.safetensors")
    _corrupt(packed)
    cases["truncated packed"] = (["--base", base, "--adapter", packed], "adapter")
    unk = d / "bad-unknown"
    shutil.copytree(a1, unk, dirs_exist_ok=True)
    t = load_file(str(unk / "adapter_model.safetensors"))
    t = {k.replace("blocks.1.", "blocks.7."): v for k, v in t.items()}
    save_file(t, str(unk / "adapter_model.safetensors"))
    cases["unknown target"] = (["--base", base, "--adapter", unk], "unknown target")
    rank = d / "bad-rank"
    shutil.copytree(a1, rank, dirs_exist_ok=True)
    t = load_file(str(rank / "adapter_model.safetensors"))
    k = next(k for k in t if "lora_B" in k)
    t[k] = t[k][:, :-1].contiguous()
    save_file(t, str(rank / "adapter_model.safetensors"))
    cases["rank mismatch"] = (["--base", base, "--adapter", rank], "rank mismatch")
    cases["missing base"] = (["--base", d / "nope.pth", "--adapter", a1], "no such")
    cases["missing adapter"] = (["--base", base, "--adapter", d / "nope"], "no such adapter")
    return cases


def test_bad_inputs(env, capsys):
    d, base, a1, _ = env
    bad_dir = d / "bad"
    bad_dir.mkdir()
    for name, (args, needle) in _bad_cases(d, base, a1).items():
        out = bad_dir / f"{name.replace(' ', '_')}.pth"
        rc = cli.main(["merge", *map(str, args), "--out", str(out)])
        err = capsys.readouterr().err.strip()
        assert rc == 1, name
        assert len(err.splitlines()) == 1 and needle in err, (name, err)
        assert not out.exists() and no_temp_files(bad_dir), name
    # the fingerprint mismatch is allowed with --force
    other = d / "other.pth"
    assert cli.main(["merge", "--base", str(other), "--adapter", str(a1), "--out", str(bad_dir / "f.pth"),
                     "--force"]) == 0
    # and plugging in refuses it the same way
    from finetune.errors import FinetuneError

    with pytest.raises(FinetuneError, match="made for another base"):
        load_model(other, adapters=[a1])


def test_pickles_are_never_loaded(env, capsys):
    d, base, _, _ = env

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(d / "pwned"),))

    torch.save({"blocks.0.att.key.lora_A": Evil()}, d / "evil.pth")
    rc = cli.main(["import-lora", str(d / "evil.pth"), "--alpha", "8", "--base", str(base), "--out",
                   str(d / "evil-out")])
    assert rc == 1 and not (d / "pwned").exists() and not (d / "evil-out").exists()
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------------------------------
# Outputs never destroy data (issue 10): existing outputs, inputs, directories we did not write


def run_cli(*args, cwd=None, preexec_fn=None, env=None):
    """The real console entry point in a subprocess: exit status and stderr as a user sees them."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "finetune.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, preexec_fn=preexec_fn, env=env)


def one_line_error(capsys, needle: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and "Traceback" not in err, err
    return err


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_merge_hf_never_deletes_an_existing_directory(env, tmp_path, capsys):
    d, base, a1, _ = env
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    for flags in ([], ["--overwrite"], ["--force"]):
        rc = cli.main(["merge", "--base", str(base), "--adapter", str(a1), "--out", str(mine), "--format", "hf",
                       *flags])
        assert rc == 1
        one_line_error(capsys, "exists" if not flags else "did not write")
        assert snapshot(mine) == {"thesis.tex": b"years of work"}
    # our own HF output: kept without --overwrite, replaced with it (the provenance file marks it as ours)
    hf = tmp_path / "hf"
    assert cli.main(["merge", "--base", str(base), "--adapter", str(a1), "--out", str(hf), "--format", "hf"]) == 0
    provenance = json.loads((hf / "rwkv_lora_merge.json").read_text())
    assert provenance["base"]["fingerprint"] == fingerprint(torch.load(base, weights_only=True))
    assert provenance["adapters"] == [{"path": str(a1), "weight": 1.0}]
    before = snapshot(hf)
    assert cli.main(["merge", "--base", str(base), "--adapter", str(a1), "--out", str(hf), "--format", "hf"]) == 1
    one_line_error(capsys, "pass --overwrite")
    assert snapshot(hf) == before
    (hf / "stale.txt").write_text("from the previous output")
    assert cli.main(["merge", "--base", str(base), "--adapter", f"{a1}:0.5", "--out", str(hf), "--format", "hf",
                     "--overwrite"]) == 0
    assert not (hf / "stale.txt").exists() and snapshot(hf)["model.safetensors"] != before["model.safetensors"]
    assert no_temp_files(tmp_path)


def test_merge_into_the_current_directory_is_refused(tmp_path, monkeypatch, capsys):
    """`--out $PWD` (or `.`) with the base and the adapter in it: refused in one line, nothing touched."""
    base = write_checkpoint(tmp_path / "base.pth", random_rwkv4_state_dict(*SHAPE, seed=11))
    make_adapter(base, tmp_path / "adapter", seed=1)
    before = snapshot(tmp_path)
    args = ["merge", "--base", "base.pth", "--adapter", "adapter", "--format", "hf", "--overwrite", "--out"]
    r = run_cli(*args, tmp_path, cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert snapshot(tmp_path) == before
    monkeypatch.chdir(tmp_path)
    assert cli.main([*args, "."]) == 1
    one_line_error(capsys, "not a valid output name")
    assert snapshot(tmp_path) == before


def test_outputs_never_write_over_inputs(env, tmp_path, capsys):
    d, base, a1, _ = env
    adapter = tmp_path / "adapter"
    import shutil

    shutil.copytree(a1, adapter)
    before = snapshot(adapter)
    base_bytes = base.read_bytes()
    attempts = [
        ["merge", "--base", base, "--adapter", adapter, "--out", base, "--force"],
        ["merge", "--base", base, "--adapter", adapter, "--out", adapter / "adapter_model.safetensors", "--force"],
        ["merge", "--base", base, "--adapter", adapter, "--out", adapter, "--format", "hf", "--force"],
        ["pack", adapter, "--out", adapter / "adapter_model.safetensors", "--force"],
        ["pack", adapter, "--out", adapter, "--force"],
        ["export-lora", adapter, "--out", adapter / "trained_tensors.safetensors", "--force"],
        ["import-lora", base, "--alpha", "8", "--base", base, "--out", base, "--force"],
    ]
    for args in attempts:
        assert cli.main([*map(str, args)]) == 1, args
        one_line_error(capsys, "input")
        assert snapshot(adapter) == before and base.read_bytes() == base_bytes, args


def test_pack_export_import_refuse_existing_outputs(env, tmp_path, capsys):
    d, base, a1, _ = env
    for cmd, out in (("pack", tmp_path / "p.safetensors"), ("export-lora", tmp_path / "e.pth")):
        out.write_bytes(b"precious")
        assert cli.main([cmd, str(a1), "--out", str(out)]) == 1
        one_line_error(capsys, "--force")
        assert out.read_bytes() == b"precious"
        assert cli.main([cmd, str(a1), "--out", str(out), "--force"]) == 0
        assert out.read_bytes() != b"precious"
        capsys.readouterr()
    # import-lora into a directory that is not an adapter: never, even with --overwrite
    exported = tmp_path / "e.pth"
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text("keep")
    for flags in ([], ["--overwrite"]):
        assert cli.main(["import-lora", str(exported), "--alpha", "8", "--base", str(base), "--out", str(notes),
                         *flags]) == 1
        one_line_error(capsys, "exists" if not flags else "did not write")
        assert snapshot(notes) == {"a.txt": b"keep"}
    # an adapter directory (ours) is replaced with --overwrite only
    imported = tmp_path / "imported"
    args = ["import-lora", str(exported), "--alpha", "8", "--base", str(base), "--out", str(imported)]
    assert cli.main(args) == 0
    assert cli.main(args) == 1
    one_line_error(capsys, "--overwrite")
    assert cli.main([*args, "--overwrite"]) == 0
    assert read_adapter(imported).meta.alpha == 8
    assert no_temp_files(tmp_path)


# ----------------------------------------------------------------------------------------------------------------------
# Written files: valid zips, checked writes (a full disk is one line and leaves the previous output intact)


def test_pth_writer_is_torch_save(tmp_path):
    """Our streaming .pth writer produces torch.save's pickle byte for byte, valid CRCs (zipfile, unzip -t), the
    final file's stem as the internal folder, 64-byte aligned records; torch.load reads it (mmap or not)."""
    import io
    import zipfile

    from finetune.tensorfiles import save_pth

    g = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(5, 3, generator=g), "h": torch.randn(7, generator=g).half(),
               "b": torch.randn(2, 1, 4, generator=g).bfloat16(), "scalar": torch.tensor(2.5, dtype=torch.float64),
               "empty": torch.zeros(0, 3)}
    buf = io.BytesIO()
    torch.save(tensors, buf)
    with zipfile.ZipFile(buf) as z:
        theirs = z.read("archive/data.pkl")
    tmp = tmp_path / ".x-tmp-name.tmp"
    save_pth(tensors, tmp, archive="final-name")
    with zipfile.ZipFile(tmp) as z:
        assert z.testzip() is None
        assert z.read("final-name/data.pkl") == theirs
        names = z.namelist()
        assert all(n.startswith("final-name/") for n in names)
        with open(tmp, "rb") as f:
            for info in z.infolist():
                if "/data/" in info.filename:
                    f.seek(info.header_offset + 26)
                    n_name, n_extra = struct.unpack("<HH", f.read(4))
                    assert (info.header_offset + 30 + n_name + n_extra) % 64 == 0, info.filename
    assert subprocess.run(["unzip", "-tq", str(tmp)], capture_output=True).returncode == 0
    for mmap in (False, True):
        back = torch.load(tmp, weights_only=True, mmap=mmap)
        assert list(back) == list(tensors)
        assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in tensors.items())


def test_merged_pth_is_a_valid_zip_named_after_the_output(env):
    import zipfile

    d, base, a1, _ = env
    out = d / ("n" * 240 + ".pth")  # a long name: temporaries must stay within NAME_MAX
    merge_adapters(base, [a1], out)
    with zipfile.ZipFile(out) as z:
        assert z.testzip() is None
        assert {n.split("/")[0] for n in z.namelist()} == {"n" * 240}
    assert subprocess.run(["unzip", "-tq", str(out)], capture_output=True).returncode == 0
    assert no_temp_files(d)


def _full_disk(limit: int):
    """preexec_fn for a child whose files cannot grow past `limit` bytes (writes fail with EFBIG, as on a full
    disk; SIGXFSZ ignored so the process lives to report it)."""
    import resource
    import signal

    def set_limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return set_limit


def test_merge_pth_on_a_full_disk_keeps_the_previous_file(env, tmp_path):
    d, base, a1, _ = env
    out = tmp_path / "merged.pth"
    merge_adapters(base, [a1], out)
    before = out.read_bytes()
    r = run_cli("merge", "--base", base, "--adapter", f"{a1}:0.5", "--out", out, "--overwrite",
                preexec_fn=_full_disk(len(before) // 2))
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and str(out) in r.stderr and "File too large" in r.stderr, r.stderr
    assert "wrote" not in r.stdout
    assert out.read_bytes() == before and no_temp_files(tmp_path)


def test_sigterm_during_a_merge_keeps_no_temporary_and_the_previous_output(env, tmp_path, monkeypatch, capsys):
    """`kill` (SIGTERM) mid-write: the command unwinds as on Ctrl-C (exit 143, one line), its temporary file is
    removed and the previous output stays. The signal is sent by the process itself from inside the write loop."""
    import signal

    import finetune.merge as merge_mod
    from finetune.cli import main as cli_main

    d, base, a1, _ = env
    out = tmp_path / "merged.pth"
    merge_adapters(base, [a1], out)
    before = out.read_bytes()
    calls = []
    real = merge_mod.all_finite

    def all_finite_then_sigterm(t):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(t)
    monkeypatch.setattr(merge_mod, "all_finite", all_finite_then_sigterm)
    rc = cli_main(["merge", "--base", str(base), "--adapter", f"{a1}:0.5", "--out", str(out), "--overwrite"])
    err = capsys.readouterr().err
    assert rc == 143 and err == "rwkv-lora merge: terminated (SIGTERM); no partial output was kept\n", err
    assert len(calls) == 3  # stopped at the signal, not after the whole file
    assert out.read_bytes() == before and no_temp_files(tmp_path)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the CLI's handler is put back


FULL_DISK_DRIVER = """
import contextlib, io, json, resource, signal, sys
from finetune import cli
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
results = []
for args in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = cli.main(args)
        except BaseException as e:
            rc = f"raised {type(e).__name__}: {e}"
    results.append([rc, err.getvalue()])
print(json.dumps(results))
"""


def test_every_writer_on_a_full_disk(env, tmp_path):
    """init, pack, export-lora, import-lora and merge to safetensors/hf: one line, exit 1, no output, no temp."""
    d, base, a1, _ = env
    exported = tmp_path / "exported.pth"
    export_args = ["export-lora", str(a1), "--out", str(exported)]
    assert cli.main(export_args) == 0
    out = tmp_path / "out"
    out.mkdir()
    commands = [
        ["init", "--n-layer", "2", "--n-embd", "64", "--vocab", "128", "--out", str(out / "init.pth")],
        ["pack", str(a1), "--out", str(out / "packed.safetensors")],
        ["export-lora", str(a1), "--out", str(out / "exported.pth")],
        ["import-lora", str(exported), "--alpha", "8", "--base", str(base), "--out", str(out / "imported")],
        ["merge", "--base", str(base), "--adapter", str(a1), "--out", str(out / "m.safetensors")],
        ["merge", "--base", str(base), "--adapter", str(a1), "--out", str(out / "hf"), "--format", "hf"],
    ]
    env_vars = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", FULL_DISK_DRIVER, json.dumps(commands)], capture_output=True,
                       text=True, env=env_vars)
    assert r.returncode == 0, r.stderr
    for args, (rc, err) in zip(commands, json.loads(r.stdout)):
        assert rc == 1, (args, rc, err)
        assert err.count("\n") == 1 and "File too large" in err and "Traceback" not in err, (args, err)
    assert list(out.iterdir()) == []


# ----------------------------------------------------------------------------------------------------------------------
# Nothing non-finite, nothing inconsistent (issue 10 item 6)


def repack(src: Path, dest: Path, edit) -> Path:
    """A copy of a packed adapter with its rwkv_lora metadata edited by `edit(meta)` (as a user might damage it)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(src), framework="pt") as f:
        md = dict(f.metadata())
    meta = json.loads(md["rwkv_lora"])
    edit(meta)
    md["rwkv_lora"] = json.dumps(meta)
    save_file(load_file(str(src)), str(dest), metadata=md)
    return dest


def test_weights_and_scalings_must_be_finite_and_consistent(env, tmp_path, capsys):
    d, base, a1, _ = env
    out = tmp_path / "m.pth"
    for w in ("inf", "nan", "1e309", "-inf"):
        assert cli.main(["merge", "--base", str(base), "--adapter", f"{a1}:{w}", "--out", str(out)]) == 1
        one_line_error(capsys, "finite")
    with pytest.raises(FinetuneError, match="finite"):
        load_model(base, adapters=[(a1, float("nan"))])
    packed = pack_adapter(a1, tmp_path / "a1.safetensors")
    for bad in (-1000, float("inf"), float("nan"), 8 / 4 * 1.01):
        damaged = repack(packed, tmp_path / "damaged.safetensors", lambda m: m.update(scaling=bad))
        assert cli.main(["merge", "--base", str(base), "--adapter", str(damaged), "--out", str(out)]) == 1
        one_line_error(capsys, "contradicts r=4, alpha=8")
        with pytest.raises(FinetuneError, match="contradicts"):
            load_model(base, adapters=[damaged])
    for field, value, needle in (("r", 0, "r must be"), ("alpha", float("inf"), "alpha must be"),
                                 ("r", 2, "rank 4")):
        damaged = repack(packed, tmp_path / "damaged.safetensors",
                         lambda m: m.update({field: value, "scaling": 8 / 2 if field == "r" else m["scaling"]}))
        assert cli.main(["merge", "--base", str(base), "--adapter", str(damaged), "--out", str(out)]) == 1
        one_line_error(capsys, needle)
    assert not out.exists() and no_temp_files(tmp_path)


def test_adapters_with_nan_values_are_refused(env, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    d, base, a1, _ = env
    import shutil

    bad = tmp_path / "nan-adapter"
    shutil.copytree(a1, bad)
    t = load_file(str(bad / "adapter_model.safetensors"))
    k = next(k for k in t if "lora_B" in k)
    t[k][0, 0] = float("nan")
    save_file(t, str(bad / "adapter_model.safetensors"))
    assert cli.main(["merge", "--base", str(base), "--adapter", str(bad), "--out", str(tmp_path / "m.pth")]) == 1
    one_line_error(capsys, "NaN or infinite")
    assert not (tmp_path / "m.pth").exists()


def test_an_adapter_without_a_base_record_needs_force(env, tmp_path, capsys):
    d, base, a1, _ = env
    A = read_adapter(a1)
    anonymous = write_adapter(tmp_path / "anon", dataclasses.replace(A.meta, base={}), A.lora, A.full)
    out = tmp_path / "m.pth"
    assert cli.main(["merge", "--base", str(base), "--adapter", str(anonymous), "--out", str(out)]) == 1
    one_line_error(capsys, "does not record which base")
    with pytest.raises(FinetuneError, match="does not record which base"):
        load_model(base, adapters=[anonymous])
    assert cli.main(["merge", "--base", str(base), "--adapter", str(anonymous), "--out", str(out), "--force"]) == 0
    torch.testing.assert_close(plugged_logits(base, [a1]), load_model(out)(torch.tensor([TOKENS]))[0], rtol=0,
                               atol=1e-4)
    assert load_model(base, adapters=[anonymous], force=True) is not None


def test_a_merge_that_overflows_writes_nothing(env, tmp_path, capsys):
    """fp16 cannot hold 1e5: the merged tensor would be inf. Refused before anything is renamed into place."""
    d, base, a1, _ = env
    A = read_adapter(a1)
    big = {**A.full, "blocks.0.ln1.weight": torch.full_like(A.full["blocks.0.ln1.weight"], 1e5)}
    loud = write_adapter(tmp_path / "loud", A.meta, A.lora, big)
    out = tmp_path / "m16.pth"
    assert cli.main(["merge", "--base", str(base), "--adapter", str(loud), "--out", str(out), "--dtype",
                     "fp16"]) == 1
    one_line_error(capsys, "blocks.0.ln1.weight does not fit in float16")
    assert not out.exists() and no_temp_files(tmp_path)
    # a weighted adapter that overflows float32 itself (W + 2 * (3e38 - W))
    huge = write_adapter(tmp_path / "huge", A.meta, A.lora,
                             {**A.full, "blocks.0.ln1.weight": torch.full_like(A.full["blocks.0.ln1.weight"], 3e38)})
    assert cli.main(["merge", "--base", str(base), "--adapter", f"{huge}:2", "--out", str(out)]) == 1
    one_line_error(capsys, "overflow")
    assert not out.exists() and no_temp_files(tmp_path)
    # a weight whose product with the LoRA scaling (or with a full tensor's change) is beyond float32 itself
    for weight in ("1e39", "-1e300"):
        assert cli.main(["merge", "--base", str(base), "--adapter", f"{a1}:{weight}", "--out", str(out)]) == 1
        one_line_error(capsys, "overflow")
        assert not out.exists() and no_temp_files(tmp_path)
    # and an alpha beyond float32 is refused when the adapter is read
    meta = {**A.meta.to_dict(), "alpha": 1e308}
    meta.pop("scaling")
    with pytest.raises(FinetuneError, match="alpha must be a positive number within float32's range"):
        AdapterMeta.from_dict(meta, "x")


def test_an_adapter_with_only_a_pickle_is_refused(env, tmp_path, capsys):
    """peft's old adapter_model.bin is a pickle: never loaded, and never silently 'merged' as nothing."""
    d, base, a1, _ = env
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "rwkv_lora.json").write_bytes((a1 / "rwkv_lora.json").read_bytes())
    (pickled / "adapter_config.json").write_bytes((a1 / "adapter_config.json").read_bytes())
    from safetensors.torch import load_file

    torch.save(load_file(str(a1 / "adapter_model.safetensors")), pickled / "adapter_model.bin")
    out = tmp_path / "m.pth"
    assert cli.main(["merge", "--base", str(base), "--adapter", str(pickled), "--out", str(out)]) == 1
    one_line_error(capsys, "no LoRA tensors found (adapter_model.bin is a pickle and is never loaded")
    assert not out.exists()
    with pytest.raises(FinetuneError, match="no LoRA tensors found"):
        load_model(base, adapters=[pickled])


def test_outputs_honour_the_umask(env, tmp_path):
    """Every writer: files 0666 & ~umask, directories 0777 & ~umask (a teammate or a server can read them)."""
    import stat

    d, base, a1, _ = env
    exported = tmp_path / "for-import.pth"
    assert cli.main(["export-lora", str(a1), "--out", str(exported)]) == 0
    for mask in (0o022, 0o007):
        out = tmp_path / f"umask-{mask:o}"
        old = os.umask(mask)
        try:
            commands = [
                ["init", "--n-layer", "1", "--n-embd", "8", "--vocab", "16", "--out", str(out / "init.pth")],
                ["pack", str(a1), "--out", str(out / "packed.safetensors")],
                ["export-lora", str(a1), "--out", str(out / "exported.pth")],
                ["import-lora", str(exported), "--alpha", "8", "--base", str(base), "--out", str(out / "imported")],
                ["merge", "--base", str(base), "--adapter", str(a1), "--out", str(out / "m.pth")],
                ["merge", "--base", str(base), "--adapter", str(a1), "--out", str(out / "m.safetensors")],
                ["merge", "--base", str(base), "--adapter", str(a1), "--out", str(out / "hf"), "--format", "hf"],
            ]
            for args in commands:
                assert cli.main(args) == 0, args
        finally:
            os.umask(old)
        paths = [p for p in out.rglob("*")]
        assert len(paths) > 10
        for p in paths:
            want = (0o777 if p.is_dir() else 0o666) & ~mask
            assert stat.S_IMODE(p.stat().st_mode) == want, (p, oct(p.stat().st_mode))


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizers travel with adapters (issue 10 item 15)


def test_the_tokenizer_travels_with_the_adapter(tmp_path, monkeypatch, capsys):
    """Recorded by content hash and carried (directory and packed file): generate and merge --format hf find it
    from anywhere, after the original file is gone."""
    import hashlib

    from transformers import AutoTokenizer

    from finetune.tokenizer import load_tokenizer

    work = tmp_path / "work"
    work.mkdir()
    base = write_checkpoint(work / "base.pth", random_rwkv4_state_dict(*SHAPE, seed=11))
    tok_path = make_char_tokenizer(work / "tokenizer.json")
    original = tok_path.read_bytes()
    monkeypatch.chdir(work)
    adapter = make_adapter(Path("base.pth"), work / "adapter", seed=3, tokenizer="tokenizer.json")  # relative
    meta = json.loads((adapter / "rwkv_lora.json").read_text())
    assert meta["tokenizer"] == "tokenizer.json sha256:" + hashlib.sha256(original).hexdigest()
    assert (adapter / "tokenizer.json").read_bytes() == original
    packed = pack_adapter(adapter, work / "adapter.safetensors")
    tok_path.unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    ours = load_tokenizer(str(adapter / "tokenizer.json"))
    for a in (adapter, packed):
        assert cli.main(["generate", "--model", str(base), "--adapter", str(a), "--prompt", "hello", "--max-tokens",
                         "4", "--temperature", "0"]) == 0, capsys.readouterr().err
        out = elsewhere / f"hf-{a.name}"
        assert cli.main(["merge", "--base", str(base), "--adapter", str(a), "--out", str(out), "--format",
                         "hf"]) == 0
        assert json.loads((out / "tokenizer.json").read_text()) == json.loads(original)
        hf_tok = AutoTokenizer.from_pretrained(str(out))
        text = "Hello there, how are you?"
        assert hf_tok(text)["input_ids"] == ours.encode(text)
        assert hf_tok.eos_token_id == 0
    capsys.readouterr()
    # a carried tokenizer.json that does not match its record is refused
    (adapter / "tokenizer.json").write_text((adapter / "tokenizer.json").read_text().replace('"a"', '"b"', 1))
    assert cli.main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(elsewhere / "x.pth")]) == 1
    one_line_error(capsys, "does not match the sha256")


def test_hf_output_always_has_a_tokenizer(env, tmp_path, capsys):
    d, base, _, a2 = env  # a2 records no tokenizer and the vocabulary is not World's
    out = tmp_path / "hf"
    assert cli.main(["merge", "--base", str(base), "--adapter", str(a2), "--out", str(out), "--format", "hf"]) == 1
    one_line_error(capsys, "pass --tokenizer")
    assert not out.exists()
    tok = make_char_tokenizer(tmp_path / "tok.json")
    assert cli.main(["merge", "--base", str(base), "--adapter", str(a2), "--out", str(out), "--format", "hf",
                     "--tokenizer", str(tok)]) == 0
    assert (out / "tokenizer.json").read_bytes() == tok.read_bytes() and (out / "tokenizer_config.json").is_file()


WORLD_TEXTS = ["Hello world, this is a test.\n\nUser: hi\n\nAssistant:", "中文测试，你好世界！🙂 emoji",
               "def f(x):\n    return x**2  # code\n\t\t", "   multiple   spaces\r\n  x", "naïve café ÿ \x00\x01"]


def test_world_vocab_hf_directory_generates_with_transformers_pipeline(tmp_path):
    """A World-vocab merge gets a tokenizer.json that transformers loads: the same ids as the World tokenizer, and
    `pipeline("text-generation")` continues a prompt greedily with the tokens our model picks."""
    from transformers import AutoTokenizer, pipeline

    from finetune.tokenizer import load_tokenizer

    base = write_checkpoint(tmp_path / "world.pth", random_rwkv4_state_dict(2, 16, 65536, seed=4))
    adapter = make_adapter(base, tmp_path / "adapter", seed=1, tokenizer="world")
    merge_adapters(base, [adapter], tmp_path / "merged.pth")
    merge_adapters(base, [adapter], tmp_path / "hf", fmt="hf")
    world = load_tokenizer("world")
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    for text in WORLD_TEXTS:
        assert hf_tok(text)["input_ids"] == world.encode(text), text
        assert hf_tok.decode(world.encode(text)) == text
    prompt = "The quick brown fox"
    ids = world.encode(prompt)
    model = load_model(tmp_path / "merged.pth")
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    pipe = pipeline("text-generation", model=str(tmp_path / "hf"))
    out = pipe(prompt, max_new_tokens=6, do_sample=False, return_tensors=True)
    assert list(out[0]["generated_token_ids"]) == ids


def test_an_adapter_plugs_in_whatever_dtype_the_model_is_loaded_in(env, capsys):
    """The fingerprint is the stored base's, not the cast model's: --dtype fp16/bf16 accept the base's adapter."""
    d, base, a1, _ = env
    ref = plugged_logits(base, [a1])
    for dtype, tol in (("fp16", 5e-2), ("bf16", 2e-1)):
        logits = plugged_logits(base, [a1], dtype=dtype)
        assert (logits - ref).abs().max() <= tol * ref.abs().max(), dtype
    tok = make_char_tokenizer(d / "tok16.json")
    assert cli.main(["generate", "--model", str(base), "--adapter", str(a1), "--tokenizer", str(tok), "--prompt", "hi",
                     "--max-tokens", "3", "--dtype", "fp16"]) == 0, capsys.readouterr().err


def test_export_lora_gives_an_integer_alpha_and_warns_about_att_output(env, tmp_path, capsys):
    """rsLoRA r=2 alpha=4: the alpha / r merge needs alpha = 4 * sqrt(2) = 5.66; exported for lora_alpha=6 with B
    rescaled, so W + 6 / 2 * B' @ A is still W + 4 / sqrt(2) * B @ A. LoRA on att.output is flagged."""
    d, base, _, a2 = env
    A2 = read_adapter(a2)
    rs = write_adapter(tmp_path / "rs", dataclasses.replace(A2.meta, use_rslora=True), A2.lora, A2.full)
    out = tmp_path / "rs.pth"
    assert cli.main(["export-lora", str(rs), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "lora_alpha=6 (r=2)" in captured.out and "5.65685" in captured.err
    assert "att.output" in captured.err and "--lora_load" in captured.err
    ex = torch.load(out, weights_only=True)
    for module, (A, B) in A2.lora.items():
        a, b = ex[f"{module}.lora_A"], ex[f"{module}.lora_B"]
        theirs = (6 / b.shape[1]) * (b.double() @ a.double())
        expect = (4 / 2 ** 0.5) * (B.double() @ A.double())
        torch.testing.assert_close(theirs, expect, rtol=1e-6, atol=1e-7)
    # an integer alpha is exported as is, without a note
    assert cli.main(["export-lora", str(a2), "--out", str(tmp_path / "plain.pth")]) == 0
    captured = capsys.readouterr()
    assert "lora_alpha=4 (r=2)" in captured.out and "note" not in captured.err


def test_250_character_output_names(env, tmp_path):
    d, base, a1, _ = env
    names = {"pth": "p" * 246 + ".pth", "safetensors": "s" * 238 + ".safetensors", "hf": "h" * 250}
    for fmt, name in names.items():
        assert len(name) == 250
        assert cli.main(["merge", "--base", str(base), "--adapter", str(a1), "--out", str(tmp_path / name),
                         "--format", fmt]) == 0
    assert cli.main(["pack", str(a1), "--out", str(tmp_path / ("k" * 238 + ".safetensors"))]) == 0
    assert cli.main(["init", "--n-layer", "1", "--n-embd", "8", "--vocab", "16", "--out",
                     str(tmp_path / ("i" * 246 + ".pth"))]) == 0
    assert len(list(tmp_path.iterdir())) == 5 and no_temp_files(tmp_path)


# ----------------------------------------------------------------------------------------------------------------------
# One format, one formula, one description (issue 11 item 6)


def test_adapter_io_needs_neither_peft_nor_the_trainer():
    """Reading, writing, merging and plugging adapters import no peft, no Lightning, no trainer and no CLI (the merge
    entry point no longer goes merge -> cli -> merge)."""
    code = ("import sys; import finetune.adapter_format, finetune.plugin, finetune.merge, finetune.checkpoint_cli; "
            "bad = [m for m in ('peft', 'pytorch_lightning', 'lightning', 'finetune.cli', 'finetune.lora', "
            "'finetune.adapters', 'finetune.config') if m in sys.modules]; print(bad)")
    env_vars = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env_vars)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout


def test_peft_loads_our_adapter_directories(env, tmp_path):
    """Directories written by `write_adapter` (training, import-lora) are peft directories: peft's own loader gives
    the plugged-in logits."""
    from train_helpers import apply_adapter

    d, base, a1, _ = env
    imported = tmp_path / "imported"
    exported = tmp_path / "exported.pth"
    assert cli.main(["export-lora", str(a1), "--out", str(exported)]) == 0
    assert cli.main(["import-lora", str(exported), "--alpha", "8", "--base", str(base), "--out", str(imported)]) == 0
    for adapter in (a1, imported):
        with torch.no_grad():
            theirs = apply_adapter(load_model(base, dtype="fp32"), adapter)(torch.tensor([TOKENS]))[0]
        torch.testing.assert_close(theirs, plugged_logits(base, [adapter]), rtol=0, atol=1e-5)


def test_an_adapter_of_another_family_is_refused(env, tmp_path, capsys):
    d, base, a1, _ = env
    A = read_adapter(a1)
    other = write_adapter(tmp_path / "rwkv7-adapter", dataclasses.replace(A.meta, family="rwkv7"), A.lora, A.full,
                          tokenizer_json=A.tokenizer_json)
    assert json.loads((other / "rwkv_lora.json").read_text())["family"] == "rwkv7"
    assert json.loads((a1 / "rwkv_lora.json").read_text())["family"] == "rwkv4"
    for flags in ([], ["--force"]):
        assert cli.main(["merge", "--base", str(base), "--adapter", str(other), "--out", str(tmp_path / "m.pth"),
                         *flags]) == 1
        one_line_error(capsys, "was made for a rwkv7 model")
    with pytest.raises(FinetuneError, match="was made for a rwkv7 model"):
        load_model(base, adapters=[other], force=True)


def test_a_pissa_adapter_merges_to_the_model_it_trained(env, tmp_path):
    """PiSSA moves part of each weight into the initial factors; the saved adapter is the change against the real
    base (rank 2r), so merging it into the checkpoint gives the model peft trained."""
    d, base, _, _ = env
    model = load_model(base, dtype="fp32")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        peft_model = add_lora(model, r=2, alpha=4, parts=("att", "ffn"), init="pissa")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        trained = peft_model(torch.tensor([TOKENS]))[0]
    meta = {"base": {"fingerprint": fingerprint(torch.load(base, weights_only=True))}, "tokenizer": None,
            "parts": ["att", "ffn"], "train": [], "recipe": {}}
    adapter = save_adapter(peft_model, tmp_path / "pissa", meta)
    A = read_adapter(adapter)
    assert A.meta.r == 4 and A.meta.alpha == 8 and A.scaling == 4 / 2
    merge_adapters(base, [adapter], tmp_path / "pissa.pth")
    with torch.no_grad():
        merged = load_model(tmp_path / "pissa.pth")(torch.tensor([TOKENS]))[0]
    torch.testing.assert_close(merged, trained, rtol=0, atol=1e-4)
    torch.testing.assert_close(plugged_logits(base, [adapter]), trained, rtol=0, atol=1e-4)


def repacked(packed: Path, out: Path, edit) -> Path:
    """A copy of a packed adapter with `edit(tensors)` applied to its tensors, metadata kept."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(packed), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, str(out), metadata=metadata)
    return out


def test_an_adapter_missing_a_part_or_holding_odd_tensors_is_refused(env, tmp_path, capsys):
    """A lost file used to merge half an adapter with exit 0; integer tensors were truncated to float; LoRA on emb
    merged while generate refused it (merged != plugged)."""
    import shutil

    from safetensors.torch import load_file, save_file

    _, base, a1, _ = env
    n_full = len(json.loads((a1 / "rwkv_lora.json").read_text())["trained_tensors"])
    packed = pack_adapter(a1, tmp_path / "a1.safetensors")
    lost_full = f"lists {n_full} tensors trained in full but holds no "
    lost_lora = "but holds no LoRA tensors for att, ffn"
    cases = []
    no_full = shutil.copytree(a1, tmp_path / "no_full")
    (no_full / "trained_tensors.safetensors").unlink()
    cases.append((no_full, lost_full))
    cases.append((repacked(packed, tmp_path / "no_full.safetensors",
                           lambda t: [t.pop(k) for k in list(t) if k.startswith("full.")]), lost_full))
    no_lora = shutil.copytree(a1, tmp_path / "no_lora")
    (no_lora / "adapter_model.safetensors").unlink()
    cases.append((no_lora, lost_lora))
    cases.append((repacked(packed, tmp_path / "no_lora.safetensors",
                           lambda t: [t.pop(k) for k in list(t) if k.startswith("lora.")]), lost_lora))
    unlisted = shutil.copytree(a1, tmp_path / "unlisted")
    meta = json.loads((unlisted / "rwkv_lora.json").read_text())
    meta["trained_tensors"] = meta["trained_tensors"][1:]
    (unlisted / "rwkv_lora.json").write_text(json.dumps(meta))
    cases.append((unlisted, "which its metadata does not list as trained"))
    ints = shutil.copytree(a1, tmp_path / "ints")
    t = load_file(str(ints / "adapter_model.safetensors"))
    first = sorted(t)[0]
    t[first] = (t[first] * 10).to(torch.int32)
    save_file(t, str(ints / "adapter_model.safetensors"))
    cases.append((ints, f"{first} is int32; adapter tensors are floating point"))
    cases.append((repacked(packed, tmp_path / "ints.safetensors",
                           lambda t: t.update({k: v.to(torch.int32) for k, v in t.items() if k.startswith("full.")})),
                  "is int32; adapter tensors are floating point"))
    emb = shutil.copytree(a1, tmp_path / "emb")
    t = load_file(str(emb / "adapter_model.safetensors"))
    t["base_model.model.emb.lora_A.weight"] = torch.zeros(4, 64)
    t["base_model.model.emb.lora_B.weight"] = torch.zeros(128, 4)
    save_file(t, str(emb / "adapter_model.safetensors"))
    cases.append((emb, "LoRA on emb, which is an embedding, not a linear layer"))
    for adapter, reason in cases:
        rc = cli.main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "m.pth")])
        err = capsys.readouterr().err
        assert rc == 1 and reason in err and err.count("\n") == 1, (adapter, err)
    assert not (tmp_path / "m.pth").exists()


def test_directory_outputs_never_replace_a_file(env, tmp_path, capsys):
    """--force onto a regular file used to move it aside and leave it behind as a hidden temporary."""
    from finetune.merge import export_rwkv_lm_lora

    _, base, a1, _ = env
    exported = tmp_path / "rwkv_lm_lora.pth"
    alpha = export_rwkv_lm_lora(a1, exported)["alpha"]
    target = tmp_path / "target"
    target.write_text("precious")
    rc = cli.main(["import-lora", str(exported), "--alpha", str(alpha), "--base", str(base), "--out", str(target),
                   "--overwrite"])
    err = capsys.readouterr().err
    assert rc == 1 and "exists and is not a directory" in err, err
    assert target.read_text() == "precious" and sorted(p.name for p in tmp_path.iterdir()) == [
        "rwkv_lm_lora.pth", "target"]


def test_adapter_specs_and_bases_say_what_is_wrong(env, tmp_path, capsys, monkeypatch):
    _, base, a1, _ = env
    monkeypatch.chdir(tmp_path)
    for spec, reason in ((f"{a1}:abc", "the weight after ':' must be a number, got 'abc'"),
                         (f"{a1}:", "the weight after ':' must be a number, got ''"),
                         (":0.5", "no adapter path before the weight")):
        assert cli.main(["merge", "--base", str(base), "--adapter", spec, "--out", "m.pth"]) == 1
        err = capsys.readouterr().err
        assert reason in err and err.count("\n") == 1, err
    (tmp_path / "adir").mkdir()
    assert cli.main(["merge", "--base", "adir", "--adapter", str(a1), "--out", "m.pth"]) == 1
    assert "adir: a directory, not a checkpoint file" in capsys.readouterr().err
