"""Quantized frozen bases (finetune.quant) and loading without doubling memory (finetune.checkpoint).

Error bounds are computed here from the quantization schemes torchao documents (per-row symmetric int8; QLoRA's
NF4: blocks of 64 scaled by their absmax onto 16 fixed levels, the absmaxes quantized to int8 in groups of 256),
not read back from the library. Training runs use tiny models (widths that NF4's 64 x 256 blocking accepts).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import random_rwkv4_state_dict, write_checkpoint
from finetune import cli, quant
from finetune.adapters import add_lora, unwrap
from finetune.plugin import LoRALinear, attach_adapters
from finetune.checkpoint import load_model as load_plain
from finetune.train.config import load_config
from finetune.errors import FinetuneError
from finetune.merge import merge_adapters

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 97
SHAPE = (2, 128, VOCAB)  # n_layer, n_embd, vocab: 128 x 128 = 16384 weights, one NF4 scale group

# QLoRA's NormalFloat4 levels (Dettmers et al. 2023, appendix E), written out independently of torchao
NF4_LEVELS = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                           -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                           0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                           0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------------------------------------
# Dequantized weights within the schemes' error bounds


def test_int8_dequantized_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) * torch.logspace(-3, 1, 64).unsqueeze(1)  # rows of very different scale
    q = quant.quantize(w, "int8")
    assert q.shape == w.shape and quant.quant_mode(q) == "int8"
    err = (quant.dequantize(q, torch.float32) - w).abs()
    # symmetric per-row int8: step s = max|W_row| / 127.5, round to nearest -> error <= s / 2
    bound = w.abs().amax(1, keepdim=True) / 255
    assert (err <= bound * (1 + 1e-4)).all(), (err / bound).max()
    assert (err > 0).any()  # really quantized
    assert quant.quantized_bytes(q) < w.numel() * 1.1  # ~1 byte a weight


def test_nf4_dequantized_within_documented_error():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(256, 256, generator=g) * 0.05
    q = quant.quantize(w, "nf4")
    assert q.shape == w.shape and quant.quant_mode(q) == "nf4"
    err = (quant.dequantize(q, torch.float32) - w).abs()
    # w ~ level * s_block: nearest of the 16 levels -> |w - level * s| <= (widest gap / 2) * s ...
    blocks = w.reshape(-1, 64)
    absmax = blocks.abs().amax(1)
    half_gap = (NF4_LEVELS[1:] - NF4_LEVELS[:-1]).max() / 2
    # ... and s itself is stored as int8 around the mean scale, 256 scales per group: step 2 * max|s - mean| / 256,
    # rounding (half a step) or clamping at +127 (one step); |level| <= 1 multiplies that error
    centred = (absmax - absmax.mean()).reshape(-1, 256)
    scale_err = (centred.abs().amax(1, keepdim=True) / 128).expand(-1, 256).reshape(-1)
    bound = (half_gap * absmax + scale_err).unsqueeze(1).expand(-1, 64).reshape(w.shape)
    assert (err <= bound * (1 + 1e-4)).all(), (err / bound).max()
    assert err.mean() < 0.1 * w.abs().mean()  # and typically far inside it
    assert quant.quantized_bytes(q) < w.numel() * 0.6  # ~half a byte a weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_dequantized_as_torchao_does_bit_for_bit(dtype):
    """quant.dequantize's own NF4 path equals torchao's get_original_weight exactly, whole and on split blocks."""
    g = torch.Generator().manual_seed(9)
    q = quant.quantize((torch.randn(512, 256, generator=g) * 0.05).to(dtype), "nf4")
    for part in (q, *torch.split(q, 128)):
        want = part.get_original_weight()
        got = quant.dequantize(part, dtype)
        assert got.dtype == want.dtype == dtype and torch.equal(got, want)


def test_nf4_refuses_widths_its_blocks_do_not_fit():
    with pytest.raises(FinetuneError, match="blocks.0.att.key.weight .*multiple of 16384"):
        quant.quantize(torch.randn(32, 32), "nf4", "blocks.0.att.key.weight")


# ----------------------------------------------------------------------------------------------------------------------
# The quantized model: what is quantized, gradients, peft, plug-in adapters


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("quant") / "base.pth", random_rwkv4_state_dict(*SHAPE, seed=1))


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_block_projections_quantized_rest_kept(base, mode):
    model = quant.load_model(base, dtype="fp32", quant=mode)
    quantized = {n for n, p in model.named_parameters() if quant.is_quantized(p)}
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert quantized == {n for n in linears if n.startswith("blocks.")} and len(quantized) == 2 * 7
    assert not quant.is_quantized(model.head.weight) and not quant.is_quantized(model.emb.weight)
    assert model.blocks[0].att.time_decay.dtype == torch.float32
    # dequantized on the fly: the forward equals the plain model whose block weights are the dequantized ones
    ref = load_plain(base, dtype="fp32")
    with torch.no_grad():
        for n in quantized:
            ref.get_parameter(n).copy_(quant.dequantize(model.get_parameter(n), torch.float32))
        idx = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(model(idx), ref(idx), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_input_gradient_through_quantized_linear(base, mode):
    lin = quant.load_model(base, dtype="fp32", quant=mode).blocks[0].ffn.key
    assert isinstance(lin, quant.QuantLinear) and not lin.weight.requires_grad
    w = quant.dequantize(lin.weight, torch.float32)
    x = torch.randn(3, 5, 128, dtype=torch.float64).float().requires_grad_()
    g = torch.randn(3, 5, 512)
    (lin(x) * g).sum().backward()
    torch.testing.assert_close(x.grad, g @ w, atol=1e-4, rtol=1e-4)


def test_peft_adapts_the_quantized_linears(base):
    model = quant.load_model(base, dtype="fp32", quant="nf4").train()
    idx = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(idx)
    peft_model = add_lora(model, r=4, alpha=8, parts=("att", "ffn"))
    rwkv = unwrap(peft_model)
    wrapped = rwkv.blocks[1].att.output
    assert isinstance(wrapped.base_layer, quant.QuantLinear)  # peft wrapped it like any nn.Linear
    lora = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    assert len(lora) == 2 * 2 * 7 and all("lora_" in n for n, _ in lora)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(idx), before)  # B = 0 at init
        for name, p in lora:
            if "lora_B" in name:
                p.normal_(std=0.1)
    F.cross_entropy(peft_model(idx)[0], idx[0]).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in lora)
    assert all(p.grad is None for p in rwkv.parameters() if quant.is_quantized(p))


@pytest.mark.parametrize("mode", ["int8", "bf16"])
def test_plugin_lora_on_a_quantized_base(base, tmp_path, mode):
    """attach_adapters' LoRALinear over an int8 / bf16-held base: y = x deq(W)^T + s * (x A^T) B^T, checked by hand;
    the factors stay in the model's fp32 (not the bf16 the weight is held in)."""
    from finetune.adapter_format import write_adapter as write_adapter_dir

    g = torch.Generator().manual_seed(4)
    A, B = torch.randn(4, 128, generator=g) * 0.1, torch.randn(128, 4, generator=g) * 0.1
    meta = {"base": {"fingerprint": None}, "tokenizer": None, "r": 4, "alpha": 8, "parts": ["att"], "train": []}
    adapter = write_adapter_dir(tmp_path / "a", meta, {"blocks.0.att.value": (A, B)}, {})
    # force: the adapter records no base (this test is about the arithmetic, not the provenance check)
    model = attach_adapters(quant.load_model(base, dtype="fp32", quant=mode), [adapter], force=True)
    lin = model.blocks[0].att.value
    assert isinstance(lin, LoRALinear) and lin.lora_A.dtype == torch.float32
    assert quant.is_quantized(lin.weight) if mode == "int8" else lin.weight.dtype == torch.bfloat16
    x = torch.randn(2, 3, 128, generator=g)
    with torch.no_grad():
        want = x @ quant.dequantize(lin.weight, torch.float32).T + 2.0 * (x @ A.T) @ B.T
        torch.testing.assert_close(lin(x), want, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# QLoRA training: the loss falls, tracks the bf16-base run, the base file is untouched; merge; generate


def make_corpus(prefix: Path, tokens) -> Path:
    from finetune.binidx import BinidxWriter

    w = BinidxWriter(str(prefix), np.uint16)
    w.add_document(np.asarray(tokens))
    w.close()
    manifest = {"format": "rwkv-lora-data", "version": 1, "documents": 1, "tokens": len(tokens),
                "tokenizer": "test-tokenizer", "vocab_size": VOCAB, "eod_id": 0, "dtype": "uint16", "template": "none",
                "shards": [{"prefix": prefix.name, "mask_prefix": None, "documents": 1, "tokens": len(tokens)}],
                "has_mask": False}
    path = prefix.with_name(prefix.name + ".json")
    path.write_text(json.dumps(manifest))
    return path


STEPS = 10


@pytest.fixture(scope="module")
def runs(base, tmp_path_factory):
    """One LoRA run per base (bf16 base, int8, nf4), same seed and data: {mode: (losses, adapter dir)}."""
    d = tmp_path_factory.mktemp("qlora")
    data = make_corpus(d / "train", np.tile(np.random.default_rng(0).integers(1, VOCAB, 23), 150))
    digest = sha256(base)
    out = {}
    for mode in ("none", "int8", "nf4"):
        cfg = load_config(None, {"model": str(base), "data": str(data), "out_dir": str(d / mode), "ctx_len": 16,
                                 "micro_bsz": 4, "max_steps": STEPS, "lr": 1e-2, "lr_final": 1e-3, "seed": 3,
                                 "precision": "bf16-mixed", "logger": "none", "lora.r": 4, "lora.alpha": 8,
                                 "base_quant": mode, "grad_checkpoint": True})
        from finetune.train.main import main

        res = main(cfg, quiet=True)
        out[mode] = ([res["losses"][s] for s in sorted(res["losses"])], Path(res["final"]))
    out["digest_after"] = sha256(base)
    out["digest_before"] = digest
    return out


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_qlora_loss_falls_and_tracks_the_bf16_base(runs, mode):
    losses, adapter = runs[mode]
    ref, _ = runs["none"]
    assert len(losses) == STEPS
    assert np.mean(losses[:2]) - np.mean(losses[-2:]) > 2.0, losses  # it learns (from ~5.1 nats)
    # margin: within 0.15 nats of the bf16-base run after the same steps (measured: < 0.05 for both)
    assert abs(np.mean(losses[-2:]) - np.mean(ref[-2:])) < 0.15, (losses, ref)
    meta = json.loads((adapter / "rwkv_lora.json").read_text())
    assert meta["base_quant"] == mode and meta["recipe"]["base_quant"] == mode


def test_base_file_untouched(runs):
    assert runs["digest_after"] == runs["digest_before"]


def test_merged_qlora_adapter_loads_in_the_rwkv_package(runs, base, tmp_path):
    from rwkv.model import RWKV as BlinkRWKV

    _, adapter = runs["nf4"]
    notes: list[str] = []
    merged = tmp_path / "merged.pth"
    merge_adapters(base, [adapter], merged, log=notes.append)
    assert any("nf4-quantized base" in n and "not in the merged model" in n for n in notes), notes
    tokens = torch.randint(0, VOCAB, (20,), generator=torch.Generator().manual_seed(6)).tolist()
    blink = BlinkRWKV(str(merged), strategy="cpu fp32", verbose=False)
    theirs = blink.forward(tokens, None, full_output=True)[0].float()
    with torch.no_grad():
        ours = load_plain(merged, dtype="fp32")(torch.tensor([tokens]))[0]
        plain = load_plain(base, dtype="fp32")(torch.tensor([tokens]))[0]
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    assert (ours - plain).abs().max() > 1e-2  # the adapter is in it


def test_generate_quantized_cli(runs, base, small_tokenizer, capsys, tmp_path):
    big = write_checkpoint(tmp_path / "v400.pth", random_rwkv4_state_dict(2, 128, 400, seed=2))
    for mode in ("int8", "nf4"):
        rc = cli.main(["generate", "--model", str(big), "--tokenizer", small_tokenizer, "--prompt", "The fox",
                       "--max-tokens", "4", "--temperature", "0", "--quant", mode])
        assert rc == 0
    assert capsys.readouterr().out.count("\n") >= 2


def test_config_refuses_quantized_full_training():
    with pytest.raises(FinetuneError, match="base_quant: 'int4'"):
        load_config(None, {"base_quant": "int4"})
    with pytest.raises(FinetuneError, match="base_quant: a quantized base is frozen"):
        load_config(None, {"base_quant": "nf4", "method": "full"})
    with pytest.raises(FinetuneError, match="pissa"):
        load_config(None, {"base_quant": "int8", "lora.init": "pissa"})
    assert load_config(None, {"base_quant": "nf4"}).base_quant == "nf4"


# ----------------------------------------------------------------------------------------------------------------------
# Loading without doubling memory

LOAD_WORKER = textwrap.dedent("""
    import json, sys
    import torch
    from finetune.checkpoint import build_from_state_dict, load_model, read_state_dict
    path, how, tiny = sys.argv[1], sys.argv[2], sys.argv[3]
    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * 4096
    load_model(tiny, dtype="bf16")  # warm-up: torch's first big ops page in ~70 MB of its own code, not the load's
    open("/proc/self/clear_refs", "w").write("5")  # peak RSS (VmHWM) := current RSS: the warm-up's peak not counted
    before = rss()
    if how == "info":  # describe without materialising: a few probes are read
        from finetune.checkpoint_cli import describe_checkpoint
        describe_checkpoint(path)
        print(json.dumps({"growth": int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
                          - before, "model": 0}))
        sys.exit(0)
    if how == "new":
        model = load_model(path, dtype="bf16")
    else:  # what load_model did before: read everything, build, then cast
        model = build_from_state_dict(read_state_dict(path), path)
        model.cast(torch.bfloat16)
    # VmHWM (this process's own peak since the reset): ru_maxrss would start at the parent's RSS at fork
    peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"growth": peak - before, "model": size}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS read from /proc (Linux)")
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_load_peak_memory_near_the_model(tmp_path, suffix):
    """fp32 file -> bf16 model: the peak RSS growth stays below model + file / 4; reading everything then casting
    (the old way) takes about file + model, which this bound rejects (checked on the same file). `info` on the file
    stays under a tenth of it."""
    from finetune.checkpoint import save_checkpoint

    path = tmp_path / f"wide{suffix}"
    save_checkpoint(random_rwkv4_state_dict(2, 512, 65536, seed=3), path)  # ~300 MB of fp32
    file_size = path.stat().st_size
    tiny = write_checkpoint(tmp_path / "tiny.pth", random_rwkv4_state_dict(*SHAPE, seed=4))
    results = {}
    for how in ("new", "old", "info"):
        out = subprocess.run([sys.executable, "-c", LOAD_WORKER, str(path), how, str(tiny)], capture_output=True,
                             text=True,
                             cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
        assert out.returncode == 0, out.stderr[-2000:]
        results[how] = json.loads(out.stdout.strip().splitlines()[-1])
    model_size = results["new"]["model"]
    bound = model_size + file_size / 4
    assert results["new"]["growth"] < bound, (results, file_size)
    assert results["old"]["growth"] > bound, (results, file_size)  # the bound tells the two apart
    assert results["info"]["growth"] < file_size / 10, (results, file_size)  # `info` reads a few probes only


# ----------------------------------------------------------------------------------------------------------------------
# Products a block of rows at a time; emb and head held as stored


@pytest.mark.parametrize("mode", ["int8", "nf4", "bf16"])
def test_big_weights_multiplied_a_block_of_rows_at_a_time(mode):
    """An 8192 x 1024 weight is dequantized (or widened) in several blocks; forward and input gradient equal the
    product with the whole weight dequantized by the library itself (torchao's own methods, bf16 -> fp32 exact)."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(8192, 1024, generator=g) * 0.03
    q = w.bfloat16() if mode == "bf16" else quant.quantize(w, mode)
    assert len(quant.row_blocks(q)) > 1
    whole = {"int8": lambda: q.dequantize(torch.float32), "nf4": lambda: q.get_original_weight().float(),
             "bf16": lambda: q.float()}[mode]()
    x = (torch.randn(2, 3, 1024, generator=g)).requires_grad_()
    y = quant.linear(x, q)
    gy = torch.randn(2, 3, 8192, generator=g)
    (y * gy).sum().backward()
    assert y.dtype == torch.float32 and y.shape == (2, 3, 8192)
    torch.testing.assert_close(y, x.detach() @ whole.t(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x.grad, gy @ whole, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def bf16_base(tmp_path_factory) -> Path:
    sd = {k: v.bfloat16() for k, v in random_rwkv4_state_dict(*SHAPE, seed=6).items()}
    return write_checkpoint(tmp_path_factory.mktemp("quant-bf16") / "base-bf16.pth", sd)


@pytest.mark.parametrize("mode, in_file", [("int8", False), ("nf4", False), ("nf4", True)])
def test_bf16_file_keeps_emb_and_head_as_stored(bf16_base, mode, in_file):
    """From a bf16 checkpoint a quantized fp32 model holds emb and head in bf16 (half their fp32 size, nothing
    rounded) and gives the logits, loss and input gradients of the plain fp32 model with the same dequantized
    block weights; an fp32 file keeps them fp32 (test above). With `in_file` (the trainer's choice) the two are not
    copied: they are the file's memory-mapped tensors, row-major as stored, their pages released after use."""
    from finetune import pages
    from finetune.checkpoint import read_state_dict
    from finetune.ops.head_ce import head_cross_entropy
    from test_pages import resident

    model = quant.build_model(read_state_dict(bf16_base), bf16_base, dtype="fp32", quant=mode, in_file=in_file)
    assert model.emb.weight.dtype == torch.bfloat16 and model.head.weight.dtype == torch.bfloat16
    for weight in (model.emb.weight, model.head.weight):
        assert bool(pages.file_mapping(weight)) == in_file and weight.is_contiguous()
    assert model.ln_out.weight.dtype == torch.float32 and model.blocks[0].ffn.key.weight.dtype == torch.float32
    ref = load_plain(bf16_base, dtype="fp32")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if quant.is_quantized(p):
                ref.get_parameter(n).copy_(quant.dequantize(p, torch.float32))
    g = torch.Generator().manual_seed(7)
    idx = torch.randint(0, VOCAB, (2, 12), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), ref(idx), atol=1e-4, rtol=1e-4)
    targets, mask = torch.randint(0, VOCAB, (2, 12), generator=g), torch.ones(2, 12)
    losses, grads = [], []
    for m in (model, ref):
        h = m(idx, apply_head=False).detach().requires_grad_()
        total, _ = head_cross_entropy(h, m.head, targets, mask)
        total.backward()
        losses.append(total)
        grads.append(h.grad)
    torch.testing.assert_close(losses[0], losses[1], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)
    if in_file:  # read, then released: nothing of emb or head resident (the file's other tensors were copied out)
        assert resident(model.emb.weight) == 0 and resident(model.head.weight) == 0


def test_bf16_mode_holds_block_projections_in_bf16_and_computes_in_fp32(base):
    """base_quant / --quant bf16 under fp32 compute: every block projection held in bf16 (half the bytes), widened
    for each product: logits equal the fp32 model whose block weights are rounded to bf16."""
    model = quant.load_model(base, dtype="fp32", quant="bf16")
    held = {n for n, p in model.named_parameters() if p.dtype == torch.bfloat16}
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert held == {n for n in linears if n.startswith("blocks.")} and len(held) == 2 * 7  # fp32 file: emb/head fp32
    assert all(isinstance(model.get_submodule(n.rsplit(".", 1)[0]), quant.QuantLinear) for n in held)
    ref = load_plain(base, dtype="fp32")
    with torch.no_grad():
        for n in held:
            ref.get_parameter(n).copy_(ref.get_parameter(n).bfloat16().float())
        idx = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(8))
        torch.testing.assert_close(model(idx), ref(idx), atol=1e-5, rtol=1e-5)
    assert quant.load_model(base, dtype="bf16", quant="bf16").base_quant == "none"  # nothing narrower than bf16


def test_library_import_noise_is_dropped():
    """torchao and bitsandbytes log at import on a CPU build of torch (CUDA extensions they cannot load, Triton and
    the optional `kernels` package absent): a user's training output must not open with those lines."""
    code = "import finetune.quant, peft, bitsandbytes, torchao.quantization"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert r.returncode == 0, r.stderr
    noise = [ln for ln in r.stderr.splitlines() if any(
        s in ln for s in ("kernels-community", "register_constant", "Could not load this library", "no triton"))]
    assert not noise, noise
