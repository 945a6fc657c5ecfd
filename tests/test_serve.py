"""The OpenAI-compatible server: a live uvicorn on 127.0.0.1 driven by the official `openai` client (and httpx for
raw requests). Expected texts come from `finetune.generate.generate_text` on a model with that one adapter plugged
in alone (`attach_adapters`), never from the server itself."""

from __future__ import annotations

import contextlib
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
from finetune.adapters import attach_adapters, load_model, pack_adapter, read_adapter, write_adapter_dir
from finetune.generate import generate_text
from finetune.models import RNNState
from finetune.serve.app import chat_parts, create_app, Message
from finetune.serve.config import ServeConfig
from finetune.serve.engine import Engine
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
