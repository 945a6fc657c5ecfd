"""RWKV-7 end to end: infctx chunks, LoRA merge (checked by the `rwkv` package), the Hugging Face directory made by
rwkv7-hf's own converter, and chat in the World / G1 format."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import write_checkpoint
from finetune import cli, load_model
from finetune.adapters import add_lora
from finetune.checkpoint import fingerprint
from finetune.infctx import chunked_loss
from finetune.models.rwkv7 import FAMILY, config_from_state_dict
from rwkv7_helpers import random_rwkv7_state_dict, rwkv_package_v7


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: a second OpenMP thread only adds barrier waits on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------------------------
# infctx


def lora_v7(path: Path, seed: int = 0) -> torch.nn.Module:
    """A tiny v7 with LoRA on att + ffn (B non-zero, so A gets gradients too) and the family's `time` group trained
    in full (the group as the RWKV-7 family defines it)."""
    torch.manual_seed(seed)
    model = add_lora(load_model(path).train(), r=4, alpha=8, parts=("att", "ffn"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    for n, p in model.get_base_model().named_parameters():
        if FAMILY.full_groups["time"](n):
            p.requires_grad_(True)
    return model


def window_loss(model: torch.nn.Module, ids: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    logits = model(ids)
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return (ce * mask.reshape(-1)).sum() / mask.sum().clamp(min=1)


def loss_and_grads(path: Path, ids: torch.Tensor, mask: torch.Tensor, chunk_len: int | None):
    model = lora_v7(path)
    if chunk_len is None:
        loss = window_loss(model, ids[:, :-1], ids[:, 1:], mask)
    else:
        loss = chunked_loss(model, ids[:, :-1], ids[:, 1:], mask, chunk_len=chunk_len)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def infctx_base(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("infctx7") / "m.pth",
                            random_rwkv7_state_dict(2, 64, 61, 32, seed=3, widths=(16, 8, 12, 24)))


def assert_same_grads(g1: dict, g2: dict) -> None:
    assert g1.keys() == g2.keys()
    for n in g1:
        assert torch.isfinite(g2[n]).all(), n
        scale = g1[n].abs().max().clamp(min=1e-6)
        assert ((g2[n] - g1[n]).abs().max() / scale) < 1e-4, n


def test_infctx_chunks_equal_one_window(infctx_base):
    """2048 tokens as 4 chunks of 512 give one 2048 window's loss (1e-5) and gradients (1e-4 relative): LoRA A/B on
    att and ffn, and every `time` tensor of RWKV-7 (w0 .. r_k, the low-rank factors)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 61, (1, 2049), generator=g)
    mask = (torch.rand(1, 2048, generator=g) > 0.3).float()
    l1, g1 = loss_and_grads(infctx_base, ids, mask, None)
    l2, g2 = loss_and_grads(infctx_base, ids, mask, 512)
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-6)
    assert any(n.endswith("att.w0") for n in g1) and any("lora_A" in n for n in g1)
    assert any(n.endswith("blocks.1.att.v1") for n in g1)  # the value residual learns through the chunks too
    assert_same_grads(g1, g2)


def test_masked_chunk_contributes_zero_never_nan(infctx_base):
    """A chunk whose targets are all masked adds nothing (RWKV-PEFT users got NaN from a per-chunk mean), and a window
    with nothing to learn gives a zero loss and zero gradients, not NaN."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 61, (1, 1025), generator=g)
    mask = torch.ones(1, 1024)
    mask[:, 256:512] = 0  # the second of four chunks of 256: nothing to learn there
    l1, g1 = loss_and_grads(infctx_base, ids, mask, None)
    l2, g2 = loss_and_grads(infctx_base, ids, mask, 256)
    assert torch.isfinite(l2)
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-6)
    assert_same_grads(g1, g2)
    # the loss is the mean over the unmasked targets only (the masked chunk's count is not in the denominator)
    model = lora_v7(infctx_base)
    with torch.no_grad():
        logits = model(ids[:, :-1])[0]
    ce = F.cross_entropy(logits, ids[0, 1:], reduction="none")
    torch.testing.assert_close(l2, ce[mask[0] > 0].mean(), rtol=1e-5, atol=1e-6)
    zero, grads = loss_and_grads(infctx_base, ids[:, :513], torch.zeros(1, 512), 256)
    assert zero.item() == 0.0
    assert all(torch.isfinite(t).all() and not t.any() for t in grads.values())


# ----------------------------------------------------------------------------------------------------------------------
# merge and the Hugging Face directory

WORLD = 65536  # every published RWKV-7 has the World vocabulary: the HF directory's tokenizer is then checked too
MERGE_TOKENS = torch.randint(0, WORLD, (20,), generator=torch.Generator().manual_seed(9)).tolist()


def v7_adapter(base: Path, out: Path, seed: int) -> Path:
    """A trained-looking RWKV-7 adapter: LoRA (r=4, B non-zero) on att r/k/v/o and ffn key/value, and every tensor of
    the family's `time` and `ln` groups perturbed and trained in full."""
    from finetune.adapter_format import write_adapter as write_adapter_dir
    from finetune.checkpoint import read_state_dict

    sd = read_state_dict(base)
    cfg = config_from_state_dict(sd)
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for i in range(cfg.n_layer):
        for part, names in FAMILY.lora_parts.items():
            for name in names:
                out_f, in_f = sd[f"blocks.{i}.{part}.{name}.weight"].shape
                lora[f"blocks.{i}.{part}.{name}"] = (torch.randn(4, in_f, generator=g) * 0.2,
                                                     torch.randn(out_f, 4, generator=g) * 0.2)
    full = {n: t.float() + torch.randn(t.shape, generator=g) * 0.05 for n, t in sd.items()
            if FAMILY.full_groups["time"](n) or FAMILY.full_groups["ln"](n)}
    meta = {"family": "rwkv7", "tokenizer": "world", "r": 4, "alpha": 8, "parts": ["att", "ffn"],
            "train": ["time", "ln"], "recipe": {"test": True},
            "base": {"fingerprint": fingerprint(sd), "n_layer": cfg.n_layer, "n_embd": cfg.n_embd,
                     "vocab_size": cfg.vocab_size, "dim_ffn": cfg.dim_ffn, "path": str(base)}}
    return write_adapter_dir(out, meta, lora, full)


@pytest.fixture(scope="module")
def merge_env(tmp_path_factory):
    d = tmp_path_factory.mktemp("merge7")
    # head size 64, as in every published model: rwkv7-hf's GroupNorm eps is head_size * 1e-5, BlinkDL's always 64e-5
    sd = random_rwkv7_state_dict(2, 128, WORLD, 64, seed=12)
    base = write_checkpoint(d / "base.pth", sd)
    adapter = v7_adapter(base, d / "adapter", seed=1)
    model = load_model(base, adapters=[adapter])
    with torch.no_grad():
        plugged = model(torch.tensor([MERGE_TOKENS]))[0]
    return d, base, adapter, plugged


def test_merged_pth_loads_in_rwkv_package_and_equals_plugged(merge_env):
    d, base, adapter, plugged = merge_env
    out = d / "merged.pth"
    assert cli.main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out)]) == 0
    from finetune.checkpoint import read_state_dict

    merged = read_state_dict(out)
    assert merged.keys() == read_state_dict(base).keys()
    [oracle] = rwkv_package_v7([(merged, MERGE_TOKENS)], d / "oracle")
    torch.testing.assert_close(oracle["logits"], plugged, atol=1e-4, rtol=0)
    # the adapter changes the model (so the check above can fail), and ours agrees on the merged file too
    with torch.no_grad():
        assert (load_model(base)(torch.tensor([MERGE_TOKENS]))[0] - plugged).abs().max() > 1e-2
        torch.testing.assert_close(load_model(out)(torch.tensor([MERGE_TOKENS]))[0], plugged, atol=1e-4, rtol=0)


def test_merge_hf_is_rwkv7_hf_conversion_that_transformers_loads(merge_env, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.tokenizer import load_tokenizer

    d, base, adapter, plugged = merge_env
    monkeypatch.setenv("HF_HOME", str(d / "hf-home"))  # transformers copies remote code into its modules cache
    out = d / "merged-hf"
    assert cli.main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out), "--format",
                     "hf"]) == 0
    assert "rwkv7-hf" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "rwkv7" and config["architectures"] == ["RWKV7ForCausalLM"]
    assert (out / "modeling_rwkv7.py").is_file() and (out / "rwkv_vocab_v20230424.txt").is_file()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".") or p.suffix == ".pth"]
    assert not [p.name for p in d.iterdir() if p.name.startswith(".")]  # no temporary left beside it
    model = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([MERGE_TOKENS])).logits[0].float()
    torch.testing.assert_close(logits, plugged, atol=1e-4, rtol=0)
    text = "User: How do bees make honey?\n\nAssistant:"
    tok = AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
    assert tok(text)["input_ids"] == load_tokenizer("world").encode(text)


def test_merge_hf_writes_the_tokenizer_it_is_given(merge_env, monkeypatch):
    """A model trained with its own tokenizer.json: the directory carries that tokenizer (rwkv7-hf's World tokenizer
    class and its special tokens are replaced), and AutoTokenizer encodes as ours does."""
    from transformers import AutoTokenizer

    from finetune.tokenizer import load_tokenizer

    d, base, adapter, _ = merge_env
    monkeypatch.setenv("HF_HOME", str(d / "hf-home"))
    demo = Path(__file__).resolve().parent.parent / "data" / "demo-tokenizer" / "tokenizer.json"
    out = d / "merged-hf-demo"
    assert cli.main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out), "--format", "hf",
                     "--tokenizer", str(demo)]) == 0
    assert json.loads((out / "tokenizer.json").read_text()) == json.loads(demo.read_text())
    assert not (out / "tokenization_rwkv7.py").exists() and not (out / "special_tokens_map.json").exists()
    text = "The fox saw the grapes hanging high above."
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok(text)["input_ids"] == load_tokenizer(str(demo)).encode(text) and tok.eos_token_id == 0



# ----------------------------------------------------------------------------------------------------------------------
# chat


def test_chat_on_v7_world_model_uses_world_format_and_keeps_state(merge_env, monkeypatch, capsys):
    """No --format, no --tokenizer: a World-vocabulary RWKV-7 (every G1 / World v3 model) chats as
    `User: ...\n\nAssistant:`, and the second turn starts from the state the first turn left: the first prompt, then
    the reply in canonical form (its text re-encoded, then "\n\n"), as generate.py's chat documents."""
    from finetune.generate import generate_text
    from finetune.tokenizer import load_tokenizer

    _, base, adapter, _ = merge_env
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"hi there\nwhat is a bee?\n")))  # chat reads bytes
    assert cli.main(["chat", "--model", str(base), "--adapter", str(adapter), "--temperature", "0",
                     "--max-tokens", "8", "--dtype", "fp32"]) == 0  # the fp32 reference below, whatever the CPU
    turns = [t for t in capsys.readouterr().out.split("\n\n") if t]
    assert len(turns) == 2 and all(t.startswith("Assistant:") for t in turns), turns
    model, tok = load_model(base, adapters=[adapter]), load_tokenizer("world")
    stop = ["\n\n", "\nUser:"]
    first, _, prompt_state = generate_text(model, tok, "User: hi there\n\nAssistant:", max_tokens=8, temperature=0,
                                           stop=stop)
    assert "Assistant:" + first == turns[0]
    _, state = model.prefill(tok.encode(first.rstrip() + "\n\n"), prompt_state)
    second = "User: what is a bee?\n\nAssistant:"
    text, _, _ = generate_text(model, tok, second, max_tokens=8, temperature=0, stop=stop, state=state)
    assert "Assistant:" + text == turns[1]
    # the carried state matters: from a fresh state the second prompt leads elsewhere (so a reset would be caught)
    carried, _ = model.prefill(tok.encode(second), state)
    fresh, _ = model.prefill(tok.encode(second))
    assert (carried - fresh).abs().max() > 1e-2
