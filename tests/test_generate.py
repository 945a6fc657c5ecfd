"""Generation: the RNN step against the parallel model, plugged-in vs merged greedy decoding, sampling, stop strings,
the generate and chat commands."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from conftest import random_rwkv4_state_dict, write_checkpoint
from finetune import cli
from finetune.generate import generate_text, generate_tokens, sample_logits
from finetune.merge import merge_adapters
from finetune import load_model
from finetune.tokenizer import load_tokenizer
from test_merge import make_adapter, make_char_tokenizer


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    tok_path = make_char_tokenizer(d / "tokenizer.json")
    vocab = load_tokenizer(str(tok_path)).vocab_size
    base = write_checkpoint(d / "base.pth", random_rwkv4_state_dict(2, 32, vocab, seed=4))
    adapter = make_adapter(base, d / "adapter", seed=5, tokenizer=str(tok_path))
    merged = d / "merged.pth"
    merge_adapters(base, [adapter], merged)
    return d, base, adapter, merged, tok_path


def test_rnn_step_equals_parallel(env):
    _, base, adapter, _, _ = env
    model = load_model(base, adapters=[adapter])
    tokens = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(tokens)[0]
    state = None
    for t, tok in enumerate(tokens[0].tolist()):
        logits, state = model.step([tok], state)
        torch.testing.assert_close(logits[0], full[t], rtol=0, atol=1e-4)
    _, pstate = model.prefill(tokens[0])
    for name in state.FIELDS:
        torch.testing.assert_close(getattr(state, name), getattr(pstate, name), rtol=1e-4, atol=1e-4)


def test_greedy_plugged_equals_merged(env):
    _, base, adapter, merged, _ = env
    prompt = [3, 9, 27, 14, 5]
    plugged = load_model(base, adapters=[adapter])
    flat = load_model(merged)
    a = [t for t, _ in generate_tokens(plugged, prompt, max_tokens=40, temperature=0, stop_token=None)]
    b = [t for t, _ in generate_tokens(flat, prompt, max_tokens=40, temperature=0, stop_token=None)]
    assert a == b and len(a) == 40
    base_only = [t for t, _ in generate_tokens(load_model(base), prompt, max_tokens=40, temperature=0,
                                               stop_token=None)]
    assert base_only != a  # the adapter matters


def test_long_prompt_rnn_mode(env):
    _, base, _, _, _ = env
    model = load_model(base)
    prompt = torch.randint(1, model.config.vocab_size, (300,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        last = model(prompt[None])[0, -1]
    logits, state = model.prefill(prompt, chunk_len=64)
    torch.testing.assert_close(logits[0], last, rtol=0, atol=1e-4)


def test_sampling():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9])
    assert sample_logits(logits, temperature=0) == 1
    assert sample_logits(logits, temperature=1.0, top_k=1) == 1
    g = torch.Generator().manual_seed(0)
    draws = {sample_logits(logits, 1.0, top_p=0.5, generator=g) for _ in range(50)}
    assert draws <= {1, 3}
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert [sample_logits(logits, 2.0, generator=g1) for _ in range(20)] == \
           [sample_logits(logits, 2.0, generator=g2) for _ in range(20)]


def test_presence_penalty_and_seed(env):
    _, base, _, _, _ = env
    model = load_model(base)
    toks = [t for t, _ in generate_tokens(model, [3, 4], max_tokens=30, temperature=0, presence_penalty=1e4,
                                          stop_token=None)]
    assert len(set(toks)) == len(toks)  # a huge presence penalty never repeats a token
    a = [t for t, _ in generate_tokens(model, [3, 4], max_tokens=20, temperature=1.0, top_p=0.9, seed=3)]
    b = [t for t, _ in generate_tokens(model, [3, 4], max_tokens=20, temperature=1.0, top_p=0.9, seed=3)]
    assert a == b


def test_stop_strings_and_streaming(env):
    _, base, adapter, _, tok_path = env
    model = load_model(base, adapters=[adapter])
    tok = load_tokenizer(str(tok_path))
    full, _, _ = generate_text(model, tok, "Hello", max_tokens=30, temperature=0, stop_token=None)
    assert len(full) > 6
    stop = full[3:5]
    pieces = []
    text, _, _ = generate_text(model, tok, "Hello", max_tokens=30, temperature=0, stop=[stop], on_text=pieces.append,
                               stop_token=None)
    assert text == full[: full.find(stop)] and "".join(pieces) == text


def test_generate_cli(env, capsys):
    _, base, adapter, merged, tok_path = env
    args = ["generate", "--prompt", "Hi there", "--max-tokens", "12", "--temperature", "0"]
    assert cli.main([*args, "--model", str(base), "--adapter", str(adapter)]) == 0  # tokenizer from the adapter
    out_plugged = capsys.readouterr().out
    assert cli.main([*args, "--model", str(merged), "--tokenizer", str(tok_path)]) == 0
    assert capsys.readouterr().out == out_plugged
    # a packed adapter works the same
    from finetune.adapters import pack_adapter

    packed = pack_adapter(adapter, Path(adapter).with_suffix(".safetensors"))
    assert cli.main([*args, "--model", str(base), "--adapter", f"{packed}:1.0"]) == 0
    assert capsys.readouterr().out == out_plugged


def test_chat_keeps_state(env, capsys, monkeypatch):
    _, base, adapter, _, tok_path = env
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\nhow are you\n"))
    assert cli.main(["chat", "--model", str(base), "--adapter", str(adapter), "--temperature", "0",
                     "--max-tokens", "15", "--format", "world"]) == 0
    out = capsys.readouterr().out
    turns = [t for t in out.split("\n\n") if t]
    assert len(turns) == 2 and all(t.startswith("Assistant:") for t in turns)
    # turn 2 == generating from the whole conversation so far as one prompt (the state carried over)
    model = load_model(base, adapters=[adapter])
    tok = load_tokenizer(str(tok_path))
    reply1 = turns[0][len("Assistant:"):]
    convo = f"User: hi\n\nAssistant:{reply1.rstrip()}\n\nUser: how are you\n\nAssistant:"
    text, _, _ = generate_text(model, tok, convo, max_tokens=15, temperature=0, stop=["\n\n", "\nUser:"])
    assert "Assistant:" + text == turns[1]


def test_bad_adapter_refused_in_generate(env, capsys):
    d, _, adapter, _, _ = env
    other = write_checkpoint(d / "other.pth", random_rwkv4_state_dict(2, 32, load_model(env[1]).config.vocab_size,
                                                                      seed=77))
    rc = cli.main(["generate", "--model", str(other), "--adapter", str(adapter), "--prompt", "x"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "made for another base" in err and len(err.splitlines()) == 1


def test_directory_as_model_is_named(tmp_path, capsys):
    rc = cli.main(["generate", "--model", str(tmp_path), "--prompt", "x", "--tokenizer", "world"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1
    assert err.endswith(f"{tmp_path}: is a directory, not a checkpoint file")
