"""The OpenAI-compatible server: a live uvicorn on 127.0.0.1 driven by the official `openai` client (and httpx for
raw requests). Expected texts come from `finetune.generate.generate_text` on a model with that one adapter plugged
in alone (`attach_adapters`), never from the server itself."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn

from conftest import random_rwkv4_state_dict, write_checkpoint
from finetune.adapter_format import pack_adapter, write_adapter as write_adapter_dir
from finetune.plugin import attach_adapters, load_model
from finetune.generate import generate_text
from finetune.models import RNNState
from finetune.errors import FinetuneError
from finetune.serve.app import create_app
from finetune.serve.command import add_parser as add_serve_parser, config_from_args
from finetune.serve.config import ServeConfig
from finetune.serve.engine import Engine, GenerationRequest
from finetune.tokenizer import load_tokenizer
from test_merge import make_adapter, make_char_tokenizer

ROOT = Path(__file__).resolve().parent.parent
KEY = "sekret-key"
ADAPTERS = ("a1", "a2", "a3")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(config: ServeConfig, engine: Engine | None = None):
    """uvicorn serving create_app(config) in a thread; yields the base URL."""
    app = create_app(config, engine)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield f"http://{config.host}:{config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    tok_path = make_char_tokenizer(d / "tokenizer.json")
    vocab = load_tokenizer(str(tok_path)).vocab_size
    base = write_checkpoint(d / "tiny.pth", random_rwkv4_state_dict(2, 32, vocab, seed=4))
    adapters = {}
    for i, name in enumerate(ADAPTERS):
        adapters[name] = make_adapter(base, d / name, seed=10 + i, r=2 + 2 * i, alpha=8, train=(),
                                      parts=("att", "ffn") if i != 1 else ("att",), tokenizer=str(tok_path))
    upload_dir = d / "uploads"
    upload_dir.mkdir()
    config = ServeConfig(model=str(base), adapters={k: str(v) for k, v in adapters.items()},
                         adapters_dir=str(upload_dir), tokenizer=str(tok_path), dtype="fp32", port=free_port(),
                         api_key=KEY, allow_upload=True, max_tokens=64, max_body_bytes=64 << 10,
                         max_upload_bytes=4 << 20)
    with live_server(config) as url:
        yield {"dir": d, "base": base, "adapters": adapters, "tok": load_tokenizer(str(tok_path)), "url": url,
               "config": config, "tok_path": tok_path}


@pytest.fixture(scope="module")
def client(env):
    return openai.OpenAI(base_url=env["url"] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def expected(env, name: str | None, prompt: str, max_tokens: int, stop=(), **sampling) -> str:
    """What `generate_text` gives on the base with `name` plugged in alone (or the bare base)."""
    model = load_model(env["base"], dtype="fp32")
    if name is not None:
        attach_adapters(model, [env["adapters"][name]])
    text, _, _ = generate_text(model, env["tok"], prompt, max_tokens=max_tokens, stop=stop,
                               temperature=sampling.pop("temperature", 0.0), **sampling)
    return text


PROMPT = "The fox saw the grapes"


def test_models_list(env, client):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "tiny" and set(ADAPTERS) <= set(ids)


def test_completion_greedy_equals_generate_text(env, client):
    for name in ("a1", "tiny"):
        r = client.completions.create(model=name, prompt=PROMPT, max_tokens=24, temperature=0)
        want = expected(env, name if name != "tiny" else None, PROMPT, 24)
        assert r.choices[0].text == want
        assert r.usage.prompt_tokens == len(env["tok"].encode(PROMPT))
        assert r.choices[0].finish_reason in ("length", "stop")


def test_completion_streaming_and_stop(env, client):
    want = expected(env, "a2", PROMPT, 30, stop=["e"])
    chunks = client.completions.create(model="a2", prompt=PROMPT, max_tokens=30, temperature=0, stop="e",
                                       stream=True)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == want and "e" not in text


def test_sampling_with_seed_and_penalties(env, client):
    kw = dict(temperature=1.0, top_p=0.9, presence_penalty=0.3, frequency_penalty=0.2, seed=7)
    r = client.completions.create(model="a3", prompt=PROMPT, max_tokens=20, **kw)
    assert r.choices[0].text == expected(env, "a3", PROMPT, 20, **kw)


def test_chat_streaming_and_not(env, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is seven plus five?"}]
    r = client.chat.completions.create(model="a1", messages=messages, max_tokens=20, temperature=0)
    stream = client.chat.completions.create(model="a1", messages=messages, max_tokens=20, temperature=0,
                                            stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == r.choices[0].message.content
    # the world/raven rendering: the char tokenizer is not World, so raven (Bob:/Alice:)
    prompt = "Be brief.\n\nBob: What is seven plus five?\n\nAlice:"
    assert r.choices[0].message.content == expected(env, "a1", prompt, 20, stop=["\n\n", "\nBob:"])


def test_errors_are_openai_shaped(env, client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="a1", prompt="hi", max_tokens=2, temperature=-1)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="a1", prompt="hi", max_tokens=10_000)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="a1", prompt="hi", max_tokens=2, top_p=0)
    bad_key = openai.OpenAI(base_url=env["url"] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
    url = env["url"]
    r = httpx.get(url + "/v1/models")  # no key at all
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    h = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(url + "/v1/completions", headers=h, content=b"{not json")
    assert r.status_code == 400 and "message" in r.json()["error"]
    r = httpx.post(url + "/v1/completions", headers=h, json={"model": "a1", "prompt": "x" * 100_000})
    assert r.status_code == 413
    # a chunked body (no Content-Length) is counted as it arrives

    def chunks():
        for _ in range(100):
            yield b"x" * 1024
    r = httpx.post(url + "/v1/completions", headers=h, content=chunks())
    assert r.status_code == 413
    r = httpx.get(url + "/v1/nowhere", headers=h)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    # the server survived all of that
    assert client.completions.create(model="a1", prompt="hi", max_tokens=2, temperature=0).choices


def test_command_refuses_exposed_host_without_key(env):
    def serve(*extra):
        return subprocess.run([sys.executable, "-m", "finetune.cli", "serve", "--model", str(env["base"]), *extra],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)
    r = serve("--host", "0.0.0.0")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "--api-key" in r.stderr, r.stderr
    r = serve("--host", "0.0.0.0", "--adapter", "x")
    assert r.returncode == 2  # argparse: NAME=PATH expected


def test_concurrent_streams_each_get_their_text(env, client):
    """8 streams over 3 adapters and the base at once: each gets exactly what it gets alone; one closed after its
    first chunk leaves the batch and the others are not disturbed."""
    jobs = [(name, f"{PROMPT} {i}") for i, name in enumerate(["a1", "a2", "a3", "tiny"] * 2)]
    want = {i: expected(env, name if name != "tiny" else None, prompt, 40) for i, (name, prompt) in enumerate(jobs)}
    got: dict[int, str] = {}
    before = httpx.get(env["url"] + "/v1/stats", headers={"Authorization": f"Bearer {KEY}"}).json()
    start = threading.Barrier(len(jobs) + 1)

    def run(i, name, prompt):
        c = openai.OpenAI(base_url=env["url"] + "/v1", api_key=KEY, max_retries=0, timeout=60)
        start.wait()
        stream = c.completions.create(model=name, prompt=prompt, max_tokens=40, temperature=0, stream=True)
        parts = []
        for chunk in stream:
            parts.append(chunk.choices[0].text if chunk.choices else "")
            if i == 0 and "".join(parts):  # the client goes away mid-stream
                stream.close()
                break
        got[i] = "".join(parts)

    threads = [threading.Thread(target=run, args=(i, n, p)) for i, (n, p) in enumerate(jobs)]
    for t in threads:
        t.start()
    start.wait()
    for t in threads:
        t.join(timeout=120)
    for i in range(1, len(jobs)):
        assert got[i] == want[i], (i, jobs[i])
    assert want[0].startswith(got[0])
    after = httpx.get(env["url"] + "/v1/stats", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert after["cancelled"] - before["cancelled"] == 1 or want[0] == got[0]
    assert after["peak_batch"] >= 2  # they were decoded together


def test_chat_second_turn_prefills_only_new_tokens(env, client):
    tok = env["tok"]
    turn1 = [{"role": "user", "content": "What is seven plus five?"}]
    r1 = client.chat.completions.create(model="a2", messages=turn1, max_tokens=12, temperature=0)
    reply = r1.choices[0].message.content
    turn2 = turn1 + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And six plus one?"}]
    r2 = client.chat.completions.create(model="a2", messages=turn2, max_tokens=12, temperature=0)
    new = "Bob: And six plus one?\n\n", "Alice:"  # what follows the cached prompt + " reply\n\n"
    assert r2.usage.model_extra["prefilled_tokens"] == sum(len(tok.encode(t)) for t in new)
    assert r2.usage.prompt_tokens_details.cached_tokens == r2.usage.prompt_tokens - sum(
        len(tok.encode(t)) for t in new)
    # the same text as a server without any cache
    config = ServeConfig(**{**env["config"].__dict__, "port": free_port(), "state_cache_bytes": 0,
                            "adapters_dir": None, "allow_upload": False})
    with live_server(config) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        r = c.chat.completions.create(model="a2", messages=turn2, max_tokens=12, temperature=0)
        assert r.usage.model_extra["prefilled_tokens"] == r.usage.prompt_tokens
    assert r.choices[0].message.content == r2.choices[0].message.content


def upload(env, name: str, data: bytes):
    return httpx.post(env["url"] + "/v1/adapters", headers={"Authorization": f"Bearer {KEY}"},
                      files={"file": ("x.safetensors", data)}, data={"name": name}, timeout=60)


def test_upload_good_adapter_then_select_it(env, client):
    packed = pack_adapter(env["adapters"]["a3"], env["dir"] / "a3-packed.safetensors")
    r = upload(env, "shared-a3", packed.read_bytes())
    assert r.status_code == 200, r.text
    assert r.json()["r"] == 6 and r.json()["base"]["fingerprint"]
    assert "shared-a3" in [m.id for m in client.models.list().data]
    same = [client.completions.create(model=m, prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text
            for m in ("shared-a3", "a3")]
    assert same[0] == same[1]
    info = httpx.get(env["url"] + "/v1/adapters/shared-a3", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert info["kind"] == "lora" and info["parts"] == ["att", "ffn"]


def test_upload_refusals(env, tmp_path):
    import pickle

    assert upload(env, "pickled", pickle.dumps({"a": torch.zeros(2)})).status_code == 400
    assert upload(env, "../evil", b"x").status_code == 400
    assert upload(env, ".hidden", b"x").status_code == 400
    assert not list(Path(env["config"].adapters_dir).glob("*evil*"))
    # an adapter for another base
    other = write_checkpoint(tmp_path / "other.pth", random_rwkv4_state_dict(2, 32, env["tok"].vocab_size, seed=9))
    wrong = pack_adapter(make_adapter(other, tmp_path / "wrong", seed=1, train=()), tmp_path / "wrong.safetensors")
    r = upload(env, "wrong", wrong.read_bytes())
    assert r.status_code == 400 and "another base" in r.json()["error"]["message"]
    # a non-finite adapter (written by hand: our writers refuse NaN)
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    good = env["dir"] / "a3-packed.safetensors"
    with safe_open(str(good), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(good))
    first = sorted(tensors)[0]
    tensors[first][0, 0] = float("nan")
    save_file(tensors, str(tmp_path / "nan.safetensors"), metadata=meta)
    r = upload(env, "nan", (tmp_path / "nan.safetensors").read_bytes())
    assert r.status_code == 400 and "NaN" in r.json()["error"]["message"]
    # an adapter training tensors in full cannot be applied per row
    full = pack_adapter(make_adapter(env["base"], tmp_path / "full", seed=2), tmp_path / "full.safetensors")
    r = upload(env, "full", full.read_bytes())
    assert r.status_code == 400 and "in full" in r.json()["error"]["message"]
    names = {p.name for p in Path(env["config"].adapters_dir).iterdir()}
    assert names <= {"shared-a3.safetensors"}, names


def _with_header(data: bytes, edit) -> bytes:
    """A safetensors file's bytes with its JSON header changed by edit(header) (the tensors' bytes untouched)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data[8 + n:]


def _with_meta(data: bytes, **fields) -> bytes:
    """A packed adapter whose rwkv_lora metadata has `fields` set to (JSON) values of any type."""
    def edit(header):
        meta = json.loads(header["__metadata__"]["rwkv_lora"])
        meta.update(fields)
        header["__metadata__"]["rwkv_lora"] = json.dumps(meta)
    return _with_header(data, edit)


def test_adapters_with_malformed_metadata_are_refused_and_never_break_the_server(env, client, tmp_path):
    """Adapters come from strangers: metadata of the wrong types (a template that is a list, a base that is a
    list, ...) is a 400 at upload that leaves nothing behind; a file dropped into the adapters directory is listed
    as skipped, never an error for every later request; a server restarted on that directory starts."""
    good = pack_adapter(env["adapters"]["a3"], tmp_path / "good.safetensors").read_bytes()
    bad = {"tmpl-list": _with_meta(good, template=["raven"]),
           "tmpl-dict": _with_meta(good, template={"user": 5, "assistant": "A: {text}"}),
           "base-list": _with_meta(good, base=[1, 2]), "parts-int": _with_meta(good, parts=5),
           "recipe-str": _with_meta(good, recipe="abc"), "kind-list": _with_meta(good, kind=["lora"]),
           "meta-list": _with_header(good, lambda h: h.__setitem__("__metadata__", [1])),
           "meta-not-text": _with_header(good, lambda h: h["__metadata__"].__setitem__("rwkv_lora", 5))}
    h = {"Authorization": f"Bearer {KEY}"}
    for name, data in bad.items():
        r = upload(env, name, data)
        assert r.status_code == 400, (name, r.status_code, r.text)
        assert r.json()["error"]["param"] == "file", name
    assert not {p.name for p in Path(env["config"].adapters_dir).iterdir()} & {f"{n}.safetensors" for n in bad}
    assert httpx.get(env["url"] + "/v1/models", headers=h).status_code == 200
    # dropped straight into a directory the server scans: skipped with its reason, the rest keeps working
    drop = tmp_path / "drop"
    drop.mkdir()
    for name, data in bad.items():
        (drop / f"{name}.safetensors").write_bytes(data)
    (drop / "fine.safetensors").write_bytes(good)
    config = ServeConfig(model=str(env["base"]), adapters_dir=str(drop), tokenizer=str(env["tok_path"]),
                         dtype="fp32", port=free_port())
    with live_server(config) as url:
        assert "fine" in [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
        r = httpx.post(url + "/v1/completions", json={"model": "tmpl-list", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 404
        skipped = {s["name"]: s["reason"] for s in httpx.get(url + "/v1/adapters").json()["skipped"]}
        assert set(skipped) == set(bad) - {"meta-list"}, skipped  # metadata not an object: not an adapter
        assert "template" in skipped["tmpl-list"] and "'base'" in skipped["base-list"], skipped


def test_request_guards(env):
    """Seeds beyond what torch's generator takes, broken JSON, cross-site browser posts, the upload cap reserved
    for requests with the key, an upload directory that does not exist, a NaN cache size."""
    url, h = env["url"], {"Authorization": f"Bearer {KEY}"}
    for seed in (2 ** 64, -(2 ** 63) - 1, 10 ** 30):
        for stream in (False, True):
            r = httpx.post(url + "/v1/completions", headers=h, json={"model": "a1", "prompt": "hi", "max_tokens": 2,
                                                                     "seed": seed, "stream": stream})
            assert r.status_code == 400 and r.json()["error"]["param"] == "seed", (seed, r.text)
    r = httpx.post(url + "/v1/completions", headers=h, json={"model": "a1", "prompt": "hi", "max_tokens": 2,
                                                             "seed": 2 ** 64 - 1, "temperature": 1})
    assert r.status_code == 200, r.text
    r = httpx.post(url + "/v1/completions", headers={**h, "content-type": "application/json"}, content=b"{bad")
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("body: not valid JSON")
    assert r.json()["error"]["param"] is None
    # a page of another site posting a form (no preflight) or a bodiless POST: refused before anything runs
    host = url.split("://")[1]
    for origin in ("http://evil.example", "null", f"http://{host}.evil.example"):
        r = httpx.post(url + "/v1/adapters?name=x", headers={**h, "Origin": origin, "content-type": "text/plain"},
                       content=b"x")
        assert r.status_code == 403 and r.json()["error"]["code"] == "cross_site", origin
    r = httpx.post(url + "/v1/adapters?name=x", headers={**h, "Origin": f"http://{host}"}, content=b"x")
    assert r.status_code == 400  # same origin: checked as an upload (and refused as one: not an adapter)
    # the upload cap (4 MiB here) only for uploads carrying the key; anyone else gets the 64 KiB body cap
    big = b"x" * (1 << 20)
    assert httpx.post(url + "/v1/adapters?name=x", content=big).status_code == 413
    assert httpx.post(url + "/v1/adapters?name=x", headers=h, content=big).status_code == 400
    with pytest.raises(FinetuneError, match="not a directory"):
        create_app(ServeConfig(model=str(env["base"]), adapters_dir=str(env["dir"] / "missing"), allow_upload=True))
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    for size in ("nan", "inf", "-1"):
        with pytest.raises(FinetuneError, match="state-cache-mb"):
            config_from_args(parser.parse_args(["serve", "--model", "x", "--state-cache-mb", size]))


def test_a_non_ascii_key_sent_as_utf8_is_accepted(env):
    config = ServeConfig(model=str(env["base"]), tokenizer=str(env["tok_path"]), dtype="fp32", port=free_port(),
                         api_key="clé-ü")
    with live_server(config) as url:
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer clé-ü".encode()}).status_code == 200
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer cle-u"}).status_code == 401


def test_batched_rows_equal_each_row_alone(env):
    """One batched step over rows using different adapters (and none) gives each row the logits and state of a
    model with that adapter alone (the `LoRALinear` path), to 1e-5 in fp32."""
    config = ServeConfig(**{**env["config"].__dict__, "adapters_dir": None, "allow_upload": False})
    engine = Engine(config)
    try:
        names = ["a1", "tiny", "a3", "a2", "a1"]
        g = torch.Generator().manual_seed(0)
        B = len(names)
        state = engine.model.zero_state(B, "cpu").map(lambda t: t + 0.1 * torch.randn(t.shape, generator=g))
        state.wkv[:, :, 2] = -1e38  # RWKV-4's running max starts empty
        tokens = torch.randint(1, engine.vocab_size, (B,), generator=g)
        with engine._lock:
            engine.routing.set([engine.served[n].slot for n in names])
            logits, new = engine.model.step(tokens, state)
            engine.routing.clear()
        for i, name in enumerate(names):
            alone = load_model(env["base"], dtype="fp32")
            if name != "tiny":
                attach_adapters(alone, [env["adapters"][name]])
            want, want_state = alone.step(tokens[i:i + 1], state.rows(slice(i, i + 1)))
            torch.testing.assert_close(logits[i], want[0], rtol=0, atol=1e-5)
            for f in RNNState.FIELDS:
                torch.testing.assert_close(getattr(new, f)[i], getattr(want_state, f)[0], rtol=0, atol=1e-5)
    finally:
        engine.close()


@pytest.mark.slow  # the first RWKV-7 prefill in a process builds (or loads) the WKV-7 kernel
def test_rwkv7_lora_and_state_adapters_served(tmp_path):
    """Every family goes through the same engine: a tiny RWKV-7 with a LoRA adapter and a state adapter."""
    from rwkv7_helpers import random_rwkv7_state_dict

    from finetune.adapter_format import save_state_adapter
    from finetune.checkpoint import fingerprint

    tok_path = make_char_tokenizer(tmp_path / "tokenizer.json")
    tok = load_tokenizer(str(tok_path))
    sd = random_rwkv7_state_dict(2, 32, tok.vocab_size, head_size=16, seed=3)
    base = write_checkpoint(tmp_path / "seven.pth", sd)
    model = load_model(base, dtype="fp32")
    g = torch.Generator().manual_seed(1)
    lora = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.endswith((".att.key", ".ffn.value")):
            lora[name] = (torch.randn(4, mod.in_features, generator=g) * 0.3,
                          torch.randn(mod.out_features, 4, generator=g) * 0.3)
    base_meta = {"fingerprint": fingerprint(sd), "n_layer": 2, "n_embd": 32, "vocab_size": tok.vocab_size}
    meta = {"family": "rwkv7", "base": base_meta, "tokenizer": str(tok_path), "r": 4, "alpha": 8,
            "parts": ["att", "ffn"], "train": []}
    lora_dir = write_adapter_dir(tmp_path / "l7", meta, lora, {})
    st = model.zero_state(1, "cpu").map(lambda t: torch.randn(t.shape[1:], generator=g) * 0.3)
    state_dir = save_state_adapter(st, tmp_path / "s7", {"family": "rwkv7", "base": base_meta,
                                                         "tokenizer": str(tok_path)})
    config = ServeConfig(model=str(base), adapters={"l7": str(lora_dir), "s7": str(state_dir)},
                         tokenizer=str(tok_path), dtype="fp32", port=free_port())
    with live_server(config) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        for name, path in (("l7", lora_dir), ("s7", state_dir)):
            got = c.completions.create(model=name, prompt=PROMPT, max_tokens=20, temperature=0).choices[0].text
            alone = attach_adapters(load_model(base, dtype="fp32"), [path])
            assert got == generate_text(alone, tok, PROMPT, max_tokens=20, temperature=0)[0], name


def test_prompts_admitted_together_are_prefilled_together(env):
    """Streams admitted in one go whose prompts have the same length (over 3 adapters and the base) go through one
    prefill forward, and each still gets exactly the greedy text of its adapter alone; a longer prompt in the same
    admission is prefilled on its own."""
    config = ServeConfig(**{**env["config"].__dict__, "adapters_dir": None, "allow_upload": False,
                            "state_cache_bytes": 0})
    engine = Engine(config)
    calls = []
    prefill = engine.model.prefill
    engine.model.prefill = lambda tokens, *a, **k: calls.append(tuple(tokens.shape)) or prefill(tokens, *a, **k)
    try:
        jobs = [(name, f"{PROMPT} {i}") for i, name in enumerate(["a1", "a2", "a3", "tiny"])]
        jobs.append(("a2", PROMPT + " and the crow"))
        done = threading.Semaphore(0)
        texts = {i: [] for i in range(len(jobs))}

        def on_event(i):
            def f(event):
                if event.kind == "text":
                    texts[i].append(event.text)
                elif event.kind in ("done", "error"):
                    assert event.kind == "done", event.text
                    done.release()
            return f

        with engine._lock:  # the worker admits all of them in one loop
            for i, (name, prompt) in enumerate(jobs):
                engine.submit(GenerationRequest(name, env["tok"].encode(prompt), 12, temperature=0.0), on_event(i))
            while engine._waiting.qsize() < len(jobs):
                time.sleep(0.01)
        for _ in jobs:
            assert done.acquire(timeout=60)
        n = len(env["tok"].encode(f"{PROMPT} 0"))
        assert sorted(calls) == sorted([(4, n), (1, len(env["tok"].encode(jobs[-1][1])))])
        for i, (name, prompt) in enumerate(jobs):
            assert "".join(texts[i]) == expected(env, name if name != "tiny" else None, prompt, 12), (i, name)
    finally:
        engine.close()


def test_packed_linear_matches_f_linear_and_falls_back(monkeypatch):
    """The panel-packed product equals F.linear to fp32 rounding at 2..32 rows and for [B, T, C] inputs, gives a row
    the same bits at every batch size, and is not used for one row, more than 32 rows, other dtypes, quantized
    weights or without the compiled kernel."""
    from finetune.ops import rows_matmul
    from finetune.serve import engine as serve_engine

    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(96, 320, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(320, 96, generator=g))
        lin.bias.copy_(torch.randn(320, generator=g))
    packed = serve_engine.PackedLinear(lin, serve_engine.pack_weight(lin.weight))
    if rows_matmul.kernel() is None:
        assert packed.packed is None
        return
    assert packed.packed is not None and packed.weight is lin.weight
    x = torch.randn(40, 96, generator=g)
    plain = torch.nn.functional.linear(x, lin.weight, lin.bias)
    with torch.inference_mode():
        full = packed(x[:32])
        torch.testing.assert_close(full, plain[:32], rtol=1e-5, atol=1e-4)
        for b in range(2, 32):
            assert torch.equal(packed(x[:b]), full[:b])
        assert torch.equal(packed(x[:16].view(2, 8, 96)), full[:16].view(2, 8, 320))
        for rows in (1, 33, 40):  # one row, a prefill's many rows: the plain weight
            assert torch.equal(packed(x[:rows]), torch.nn.functional.linear(x[:rows], lin.weight, lin.bias))
    assert serve_engine.pack_weight(lin.weight.to(torch.bfloat16)) is None
    assert serve_engine.pack_weight(lin.weight.to(torch.float64)) is None
    model = torch.nn.Sequential(torch.nn.Linear(8, 30), torch.nn.Linear(8, 8).to(torch.bfloat16))
    assert serve_engine.pack_linears(model) == 48 * 8 * 4  # 30 outputs padded to two 24-column panels
    assert type(model[0]) is serve_engine.PackedLinear and type(model[1]) is torch.nn.Linear
    if importlib.util.find_spec("torchao") is not None:  # a quantized weight keeps its own kernels
        from finetune.quant import quantize
        assert serve_engine.pack_weight(quantize(lin.weight.detach(), "int8")) is None
        assert serve_engine.pack_weight(quantize(torch.randn(128, 128, generator=g), "nf4")) is None
    monkeypatch.setattr(rows_matmul, "kernel", lambda: None)
    assert serve_engine.pack_weight(lin.weight) is None


def test_routing_keeps_its_version_across_steps_with_the_same_rows():
    """The per-batch LoRA factors are rebuilt when the rows' adapters change, not at every decode step (the engine
    clears the routing after each step)."""
    from finetune.serve.engine import LoRARouting

    routing = LoRARouting()
    routing.set([1, 2, 0])
    version = routing.version
    routing.clear()
    routing.set([1, 2, 0])
    assert routing.version == version and routing.slots == [1, 2, 0] and routing.uniform is None
    routing.clear()
    routing.set([1, 2])
    assert routing.version == version + 1


@pytest.mark.parametrize("family", ["4", "5", "6", "7"])
def test_packed_base_steps_like_the_plain_one(tmp_path, family):
    """Every family the engine serves: all its linear layers (head included) get packed, and a 3-row step (and a
    prefill, RWKV-4/5/6) gives the unpacked model's logits and state to fp32 rounding."""
    from rwkv56_checkpoints import random_rwkv5_state_dict, random_rwkv6_state_dict
    from rwkv7_helpers import random_rwkv7_state_dict
    from finetune.ops import rows_matmul
    from finetune.serve.engine import PackedLinear, pack_linears

    if rows_matmul.kernel() is None:
        pytest.skip("no C++ compiler for the CPU kernels")
    V = 97
    sd = {"4": lambda: random_rwkv4_state_dict(2, 64, V, seed=1),
          "5": lambda: random_rwkv5_state_dict(2, 64, V, head_size=16, seed=1),
          "6": lambda: random_rwkv6_state_dict(2, 64, V, head_size=16, seed=1),
          "7": lambda: random_rwkv7_state_dict(2, 64, V, head_size=16, seed=1)}[family]()
    base = write_checkpoint(tmp_path / "m.pth", sd)
    plain, packed = load_model(base, dtype="fp32"), load_model(base, dtype="fp32")
    linears = [name for name, m in plain.named_modules() if isinstance(m, torch.nn.Linear)]
    panel = rows_matmul.PANEL
    assert pack_linears(packed) == sum(-(-plain.get_submodule(n).out_features // panel) * panel
                                       * plain.get_submodule(n).in_features * 4 for n in linears)
    assert all(type(packed.get_submodule(n)) is PackedLinear for n in linears) and "head" in linears
    g = torch.Generator().manual_seed(0)
    state = plain.zero_state(3, "cpu")
    tokens = torch.randint(1, V, (3,), generator=g)
    runs = [("step", tokens)] + ([("prefill", torch.randint(1, V, (3, 5), generator=g))] if family != "7" else [])
    for method, ids in runs:
        want, want_state = getattr(plain, method)(ids, state)
        got, got_state = getattr(packed, method)(ids, state)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
        for f in RNNState.FIELDS:
            torch.testing.assert_close(getattr(got_state, f), getattr(want_state, f), rtol=1e-5, atol=1e-4)


def engine_text(engine: Engine, name: str, prompt: str, tokens: int, tok) -> str:
    """One greedy request through the engine's worker, its streamed text joined."""
    done = threading.Semaphore(0)
    parts: list[str] = []

    def on_event(event):
        if event.kind == "text":
            parts.append(event.text)
        elif event.kind in ("done", "error"):
            assert event.kind == "done", event.text
            done.release()

    engine.submit(GenerationRequest(name, tok.encode(prompt), tokens, temperature=0.0), on_event)
    assert done.acquire(timeout=60)
    return "".join(parts)


@pytest.mark.parametrize("quant", ["int8", "bf16"])
def test_quantized_base_served_like_generate_quant(env, quant):
    """`serve --quant int8|bf16`: the block projections are held quantized / in bf16 (nothing packed), and an
    adapter's greedy text equals `generate --quant` with that adapter plugged in (plugin.load_model(quant=...)).
    NF4 needs matrices of 16384+ weights (test_quant covers it); this base is 32 wide."""
    config = ServeConfig(**{**env["config"].__dict__, "adapters_dir": None, "allow_upload": False, "quant": quant})
    engine = Engine(config)
    try:
        from finetune.quant import is_quantized
        key = engine.model.blocks[0].att.key
        assert is_quantized(key.weight) if quant == "int8" else key.weight.dtype == torch.bfloat16
        assert getattr(key, "packed", None) is None
        got = engine_text(engine, "a1", PROMPT, 10, env["tok"])
    finally:
        engine.close()
    alone = load_model(env["base"], [env["adapters"]["a1"]], dtype="fp32", quant=quant)
    want, _, _ = generate_text(alone, env["tok"], PROMPT, max_tokens=10, temperature=0.0)
    assert got == want


def test_no_pack_keeps_one_copy_and_the_same_text(env):
    """`serve --no-pack`: no packed copies (packed_bytes 0, plain nn.Linear products) and the same greedy text."""
    config = ServeConfig(**{**env["config"].__dict__, "adapters_dir": None, "allow_upload": False,
                            "pack_weights": False})
    engine = Engine(config)
    try:
        assert engine.packed_bytes == 0
        assert all(getattr(m, "packed", None) is None for m in engine.model.modules())
        assert engine_text(engine, "a2", PROMPT, 10, env["tok"]) == expected(env, "a2", PROMPT, 10)
    finally:
        engine.close()


def test_adapters_with_one_tokenizer_share_one_ready_instance(tmp_path):
    """Served names whose tokenizer is the same (here World, recorded by two adapters and given for the base) use one
    tokenizer object, whose vocabulary is already read when the engine starts: the first request of each adapter
    used to wait ~1 s while its own copy parsed the vocabulary file."""
    base = write_checkpoint(tmp_path / "w.pth", random_rwkv4_state_dict(1, 16, 65536, seed=2))
    adapters = {name: str(make_adapter(base, tmp_path / name, seed=i, r=2, train=(), tokenizer="world"))
                for i, name in enumerate(["w1", "w2"])}
    engine = Engine(ServeConfig(model=str(base), adapters=adapters, tokenizer="world", dtype="fp32"))
    try:
        toks = {name: engine.served[name].tokenizer for name in ["w1", "w2", "w"]}
        assert toks["w1"] is toks["w2"] is toks["w"] is engine.tokenizer
        assert engine.tokenizer._id_to_bytes is not None  # read at startup, not by the first request
        assert engine_text(engine, "w2", "Hello", 3, engine.tokenizer) == \
            generate_text(load_model(base, [adapters["w2"]], dtype="fp32"), load_tokenizer("world"), "Hello",
                          max_tokens=3, temperature=0.0)[0]
    finally:
        engine.close()


@pytest.mark.parametrize("packed", [False, True])
def test_mixed_rows_get_their_own_adapter_at_every_position(packed):
    """`MultiLoRALinear` on a batch of rows with different adapters (and none), one token and several (a prefill's
    [B, T, in]): each row is x W^T + (x A_s^T) (scaling B_s)^T of its own adapter, computed here in float64."""
    from finetune.serve.engine import LoRARouting, MultiLoRALinear, PackedLinear, pack_weight

    g = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(24, 40, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(40, 24, generator=g))
    if packed:
        if pack_weight(lin.weight) is None:
            pytest.skip("no C++ compiler for the CPU kernels")
        lin = PackedLinear(lin, pack_weight(lin.weight))
    routing = LoRARouting()
    layer = MultiLoRALinear(lin, routing)
    factors = {1: (torch.randn(3, 24, generator=g), torch.randn(40, 3, generator=g), 0.5),
               2: (torch.randn(5, 24, generator=g), torch.randn(40, 5, generator=g), 2.0)}
    for slot, (A, B, scaling) in factors.items():
        layer.set_slot(slot, A, B, scaling)
    slots = [1, 0, 2, 1, 2]
    for T in (1, 4):
        x = torch.randn(len(slots), T, 24, generator=g)
        routing.set(slots)
        with torch.inference_mode():
            got = layer(x)
        routing.clear()
        W = lin.weight.detach().double()
        for i, s in enumerate(slots):
            want = x[i].double() @ W.T
            if s in factors:
                A, B, scaling = factors[s]
                want = want + (x[i].double() @ A.double().T) @ (scaling * B.double()).T
            torch.testing.assert_close(got[i].double(), want, rtol=1e-5, atol=1e-4)
