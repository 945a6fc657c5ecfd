"""Generation: the RNN step against the parallel model, plugged-in vs merged greedy decoding, sampling, stop strings,
the generate and chat commands."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import random_rwkv4_state_dict, write_checkpoint
from finetune import cli
from finetune.errors import FinetuneError, Terminated
from finetune.generate import Penalties, generate_text, generate_tokens, sample_logits, sampling_probs
from finetune.merge import merge_adapters
from finetune import load_model
from finetune.templates import unescape
from finetune.tokenizer import load_tokenizer
from test_merge import make_adapter, make_char_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


@pytest.mark.parametrize("values, want", [
    ([0.0, float("inf"), 1.0], 1), ([float("-inf"), 2.0, float("-inf")], 1), ([float("nan"), 1.0], None),
    ([float("inf"), float("nan")], None), ([float("-inf")] * 3, None), ([float("inf")] * 2, None),
    ([float("inf"), float("-inf")], None)])
def test_sampling_refuses_nan_or_no_finite_logits(values, want):
    """A NaN anywhere, or not one finite logit, is a broken model (one line); +-inf among finite ones is fine."""
    if want is None:
        with pytest.raises(FinetuneError, match="NaN"):
            sample_logits(torch.tensor(values), temperature=0)
    else:
        assert sample_logits(torch.tensor(values), temperature=0) == want


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
    # fp32 whatever the CPU: `auto` is bf16 on CPUs with native bf16, where plugged and merged may round apart
    args = ["generate", "--prompt", "Hi there", "--max-tokens", "12", "--temperature", "0", "--dtype", "fp32"]
    assert cli.main([*args, "--model", str(base), "--adapter", str(adapter)]) == 0  # tokenizer from the adapter
    out_plugged = capsys.readouterr().out
    assert cli.main([*args, "--model", str(merged), "--tokenizer", str(tok_path)]) == 0
    assert capsys.readouterr().out == out_plugged
    # a packed adapter works the same
    from finetune.adapter_format import pack_adapter

    packed = pack_adapter(adapter, Path(adapter).with_suffix(".safetensors"))
    assert cli.main([*args, "--model", str(base), "--adapter", f"{packed}:1.0"]) == 0
    assert capsys.readouterr().out == out_plugged


def test_chat_keeps_state(env, capsys, monkeypatch):
    _, base, adapter, _, tok_path = env
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"hi\nhow are you\n"), encoding="utf-8"))
    assert cli.main(["chat", "--model", str(base), "--adapter", str(adapter), "--temperature", "0",
                     "--max-tokens", "15", "--format", "world", "--dtype", "fp32"]) == 0  # as the fp32 reference
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


# ---- settings refused in one line, before the model is loaded


@pytest.mark.parametrize("args,named", [
    (["--max-tokens", "-5"], "--max-tokens -5: must be a positive"),
    (["--top-p", "0"], "--top-p 0.0: must be in (0, 1]"),
    (["--top-p", "-1"], "--top-p -1.0"),
    (["--top-p", "2"], "--top-p 2.0"),
    (["--top-p", "nan"], "--top-p nan"),
    (["--top-k", "-3"], "--top-k -3: must be an integer >= 0"),
    (["--temperature", "-1"], "--temperature -1.0: must be a finite number >= 0"),
    (["--temperature", "nan"], "--temperature nan"),
    (["--temperature", "inf"], "--temperature inf"),
    (["--presence-penalty", "-0.5"], "--presence-penalty -0.5: must be a finite number >= 0"),
    (["--frequency-penalty", "inf"], "--frequency-penalty inf"),
    (["--frequency-penalty", "nan"], "--frequency-penalty nan"),
    (["--penalty-decay", "1.5"], "--penalty-decay 1.5: must be in [0, 1]"),
    (["--seed", str(2 ** 64)], f"--seed {2 ** 64}: must be an integer"),  # beyond torch's generator
])
def test_bad_settings_are_refused_in_one_line(tmp_path, capsys, args, named):
    # the checkpoint does not even exist: the settings are checked first, in a second, not after loading a model
    for command in (["generate", "--prompt", "x"], ["chat"]):
        rc = cli.main([*command, "--model", str(tmp_path / "none.pth"), *args])
        err = capsys.readouterr().err.strip()
        assert rc == 1 and len(err.splitlines()) == 1 and named in err, err


def test_invalid_utf8_prompt_is_one_line(env):
    _, base, _, _, tok_path = env
    # a shell hands the bytes over as they are; Python turns the invalid one into a lone surrogate
    r = subprocess.run([sys.executable, "-m", "finetune.cli", "generate", "--model", str(base), "--tokenizer",
                        str(tok_path), "--prompt", b"caf\xe9 au lait"], cwd=ROOT, capture_output=True)
    err = r.stderr.decode().strip()
    assert r.returncode == 1 and err == ("rwkv-lora generate: error: --prompt is not valid UTF-8 (byte 0xe9 at "
                                         "character 3)")


def test_invalid_utf8_on_chat_stdin_is_one_line(env, capsys, monkeypatch):
    _, base, _, _, tok_path = env
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"hi\nna\xefve\nnever read\n"), encoding="utf-8"))
    rc = cli.main(["chat", "--model", str(base), "--tokenizer", str(tok_path), "--temperature", "0",
                   "--max-tokens", "5", "--format", "raven"])
    captured = capsys.readouterr()
    assert rc == 1 and captured.out.startswith("Alice:") and captured.out.count("Alice:") == 1  # line 1 answered
    assert captured.err.strip() == "rwkv-lora chat: error: stdin line 2 is not valid UTF-8 (byte 0xef at byte 2)"


def newline_model(path: Path, tok_path: Path) -> Path:
    """A 1-layer RWKV-4 that always says "\n" greedily: ln_out gives its bias (ones) whatever the input, and only
    the newline's head row is non-zero (logit 16, every other 0)."""
    tok = load_tokenizer(str(tok_path))
    sd = random_rwkv4_state_dict(1, 16, tok.vocab_size, seed=1)
    sd["ln_out.weight"].zero_()
    sd["ln_out.bias"] = torch.ones(16)
    sd["head.weight"].zero_()
    sd["head.weight"][tok.encode("\n")[0]] = 1.0
    return write_checkpoint(path, sd)


def test_escapes_in_prompt_and_stop(tmp_path, capsys):
    # typed on a command line: backslash-n is a newline, backslash-t a tab, a doubled backslash one backslash
    assert unescape(r"a\nb\tc\\nd\q\r") == "a\nb\tc\\nd\\q\r"
    tok_path = make_char_tokenizer(tmp_path / "tok.json")
    model = newline_model(tmp_path / "nl.pth", tok_path)
    args = ["generate", "--model", str(model), "--tokenizer", str(tok_path), "--temperature", "0", "--max-tokens",
            "5", "--dtype", "fp32", "--prompt", r"ab\ncd"]
    assert cli.main(args) == 0
    assert capsys.readouterr().out == "\n" * 5 + "\n"
    assert cli.main([*args, "--stop", r"\n"]) == 0  # --stop takes the escapes too: it stops at once
    assert capsys.readouterr().out == "\n"


def test_tokenizer_file_named_world_something_is_that_file(env, tmp_path, capsys, monkeypatch):
    # only the word `world` means the World tokenizer (65536 tokens: refused for this model); any other name is a file
    _, base, _, _, tok_path = env
    monkeypatch.chdir(tmp_path)
    Path("worldtok.json").write_bytes(tok_path.read_bytes())
    args = ["generate", "--model", str(base), "--prompt", "hi", "--max-tokens", "2", "--dtype", "fp32"]
    assert cli.main([*args, "--tokenizer", "worldtok.json"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert cli.main([*args, "--tokenizer", "world"]) == 1
    assert "tokenizer world has 65536 tokens" in capsys.readouterr().err


def test_a_prompt_the_tokenizer_cannot_encode_is_one_line(env, tmp_path, capsys, monkeypatch):
    from tokenizers import Tokenizer, models, pre_tokenizers

    _, base, _, _, _ = env
    words = Tokenizer(models.WordLevel(vocab={"<|endoftext|>": 0, "hello": 1, "the": 2}))  # no [UNK]
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.save(str(tmp_path / "words.json"))
    args = ["--model", str(base), "--tokenizer", str(tmp_path / "words.json"), "--max-tokens", "2"]
    assert cli.main(["generate", *args, "--prompt", "hello the"]) == 0
    capsys.readouterr()
    assert cli.main(["generate", *args, "--prompt", "zzz"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"rwkv-lora generate: error: {tmp_path / 'words.json'}: this tokenizer cannot encode")
    assert len(err.splitlines()) == 1
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"zzz\n")))
    assert cli.main(["chat", *args]) == 1
    assert "this tokenizer cannot encode" in capsys.readouterr().err


def test_sigterm_in_a_streaming_command_claims_nothing_about_files(monkeypatch, capsys):
    def terminated(args):
        raise Terminated

    monkeypatch.setattr("finetune.generate.run_generate", terminated)
    assert cli.main(["generate", "--model", "m.pth", "--prompt", "x"]) == 143
    assert capsys.readouterr().err == "rwkv-lora generate: terminated (SIGTERM)\n"


class Bf16Logits:
    """A stand-in model that always gives the same bf16 logits: 4.4375 for token 1, 4.40625 for token 2."""

    def __init__(self):
        self.logits = torch.zeros(1, 8, dtype=torch.bfloat16)
        self.logits[0, 1], self.logits[0, 2] = 4.4375, 4.40625

    def prefill(self, tokens, state=None, chunk_len=1024):
        return self.logits.clone(), state

    def step(self, tokens, state=None):
        return self.logits.clone(), state


def test_penalties_subtract_in_fp32_whatever_the_compute_dtype():
    # token 1 comes first; with a 0.04 presence penalty it is 4.3975 in fp32 (ChatRWKV's logits are fp32), below
    # token 2. Subtracted in bf16 it would round to 4.40625, a tie that argmax gives back to token 1.
    toks = [t for t, _ in generate_tokens(Bf16Logits(), [3], max_tokens=2, temperature=0, presence_penalty=0.04,
                                          stop_token=None)]
    assert toks == [1, 2]


# ---- ChatRWKV's sampling and penalties, against the rwkv package's PIPELINE


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 0.5, 0), (0.7, 0.9, 0), (1.3, 0.8, 5), (2.0, 0.95, 20),
                                                      (0.4, 0.6, 3), (0.0, 0.9, 0)])
def test_sampling_distribution_is_chatrwkvs(monkeypatch, temperature, top_p, top_k):
    from rwkv.utils import PIPELINE

    logits = torch.randn(300, generator=torch.Generator().manual_seed(int(10 * temperature + top_k))) * 1.5
    seen = {}

    def choice(a, p):  # what PIPELINE.sample_logits draws from
        seen["p"] = np.asarray(p, dtype=np.float64)
        return int(np.argmax(p))

    monkeypatch.setattr(np.random, "choice", choice)
    # sample_logits does not use its PIPELINE (model, tokenizer): called on the class, without building one
    PIPELINE.sample_logits(None, logits.clone(), temperature=temperature, top_p=top_p, top_k=top_k)
    if temperature == 0:
        assert sample_logits(logits, temperature, top_p, top_k) == int(np.argmax(seen["p"]))
        return
    ours = sampling_probs(logits, temperature, top_p, top_k).numpy()
    assert ((ours > 0) == (seen["p"] > 0)).all() and 1 < (ours > 0).sum() < 300
    np.testing.assert_allclose(ours, seen["p"], rtol=1e-5, atol=1e-7)


EXEMPT = [" ", "\t", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]  # tokens ChatRWKV counts with weight 0
WORDS = [" the", " cat", " sat", " on", " mat", " and", " a", " dog", " ran", " far"]


@pytest.fixture(scope="module")
def world_model(tmp_path_factory):
    """A random 2 x 32 RWKV-4 with the World vocabulary whose head favours a few space/digit tokens and a few words
    (all share one direction with ln_out's bias), so that greedy decoding meets both kinds of repeats."""
    tok = load_tokenizer("world")
    sd = random_rwkv4_state_dict(2, 32, 65536, seed=0)
    g = torch.Generator().manual_seed(1)
    u = torch.randn(32, generator=g)
    u = u / u.norm()
    sd["ln_out.bias"] = u
    for text, scale in [(t, 3.0) for t in EXEMPT] + [(w, 2.7) for w in WORDS]:
        (tid,) = tok.encode(text)
        sd["head.weight"][tid] = u * scale + torch.randn(32, generator=g) * 0.2
    return write_checkpoint(tmp_path_factory.mktemp("world") / "world.pth", sd), tok


def test_penalties_equal_chatrwkv_pipeline(world_model):
    from rwkv.model import RWKV as BlinkRWKV
    from rwkv.utils import PIPELINE, PIPELINE_ARGS

    path, tok = world_model
    presence, frequency, decay, n = 0.4, 1.0, 0.9, 48
    pipeline = PIPELINE(BlinkRWKV(str(path), strategy="cpu fp32", verbose=False), "rwkv_vocab_v20230424")
    expected = []
    draw = pipeline.sample_logits

    def recorded(*args, **kwargs):
        expected.append(draw(*args, **kwargs))
        return expected[-1]

    pipeline.sample_logits = recorded
    pipeline.generate("Hello", token_count=n, args=PIPELINE_ARGS(
        temperature=0, top_p=0, alpha_presence=presence, alpha_frequency=frequency, alpha_decay=decay,
        token_stop=[0]))
    model = load_model(path)

    def ours(**kw):
        settings = dict(temperature=0, presence_penalty=presence, frequency_penalty=frequency, penalty_decay=decay,
                        tokenizer=tok)
        return [t for t, _ in generate_tokens(model, tok.encode("Hello"), max_tokens=n, **{**settings, **kw})]

    assert ours() == expected and len(expected) == n
    exempt = {tok.encode(t)[0] for t in EXEMPT}
    assert sum(t in exempt for t in expected) >= 5  # spaces and digits: presence penalty only
    assert any(expected.count(t) > 1 for t in set(expected) - exempt)  # words repeat: decayed counts matter
    # both rules change this run: without the decay, or without the exemption, the tokens differ
    assert ours(penalty_decay=1.0) != expected
    assert ours(tokenizer=None) != expected


def test_penalties_follow_the_formula():
    tok = load_tokenizer("world")
    space, word = tok.encode(" ")[0], tok.encode(" cat")[0]
    pen = Penalties(presence=0.5, frequency=0.25, decay=0.9, tokenizer=tok)
    logits = torch.zeros(65536)
    for t in (word, space, word, space):
        pen.update(t)
    out = pen.apply(logits)
    # word: seen at steps 1 and 3 -> count 0.9^3 + 0.9; space: seen but exempt -> count 0, presence only
    assert out[word].item() == pytest.approx(-(0.5 + 0.25 * (0.9 ** 3 + 0.9)), abs=1e-6)
    assert out[space].item() == pytest.approx(-0.5, abs=1e-6)
    assert int((out != 0).sum()) == 2 and logits.abs().sum() == 0  # nothing else, and the input is untouched


def test_chat_talks_in_the_format_the_adapter_was_trained_in(env, tmp_path, monkeypatch, capsys):
    """An adapter records the chat template of its data (`prepare --template`): `chat` uses it (User/Assistant here,
    although this tokenizer alone would mean Raven's Bob/Alice); --format still overrides it."""
    from finetune.adapter_format import read_adapter, write_adapter

    _, base, a1, _, _ = env
    a = read_adapter(a1)
    a.meta.template = "world"
    world = write_adapter(tmp_path / "world", a.meta, a.lora, a.full, tokenizer_json=a.tokenizer_json)
    assert read_adapter(world).meta.template == "world"
    replies = {}
    for name, args in {"recorded": ["--adapter", str(world)], "none": ["--adapter", str(a1)],
                       "override": ["--adapter", str(world), "--format", "raven"]}.items():
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"hi there\n")))
        assert cli.main(["chat", "--model", str(base), *args, "--temperature", "0", "--max-tokens", "4"]) == 0
        replies[name] = capsys.readouterr().out
    assert replies["recorded"].startswith("Assistant:"), replies
    assert replies["none"].startswith("Alice:") and replies["override"].startswith("Alice:"), replies
