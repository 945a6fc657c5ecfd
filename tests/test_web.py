"""The web page's data routes (finetune/serve/web.py): the runs listing read from a real tiny training run, path
traversal refused, starting and stopping a real training subprocess, the allow_train switch and the key."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from conftest import random_rwkv4_state_dict, write_checkpoint
from finetune.train.main import main
from finetune.train.run import OutDirLock
from test_lora import VOCAB, config, make_corpus, pattern_tokens
from web_helpers import make_app

KEY = "sesame-1234"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A real 2-step LoRA run (with validation) under runs/done, and its inputs for more runs."""
    tmp = tmp_path_factory.mktemp("web")
    ckpt = write_checkpoint(tmp / "tiny.pth", random_rwkv4_state_dict(2, 32, VOCAB, seed=1))
    data = make_corpus(tmp / "train", pattern_tokens())
    val = make_corpus(tmp / "val", pattern_tokens(20, seed=0))
    runs = tmp / "runs"
    main(config(tmp, ckpt, data, out_dir=str(runs / "done"), max_steps=2, val_data=str(val), val_every=1),
         quiet=True)
    return {"tmp": tmp, "ckpt": ckpt, "data": data, "val": val, "runs": runs}


def client(trained: dict[str, Path], **over) -> TestClient:
    return TestClient(make_app(trained["tmp"], runs_dir=trained["runs"], **over))


def test_runs_listing_reads_a_real_run(trained):
    c = client(trained)
    runs = c.get("/api/runs").json()
    done = next(r for r in runs if r["name"] == "done")
    rows = c.get("/api/runs/done").json()["rows"]
    assert done["status"] == "finished" and done["step"] == 2 and done["max_steps"] == 2
    assert done["eta_s"] is None and not done["stoppable"]
    last_train = [r for r in rows if r["train_loss"] is not None][-1]
    assert last_train["step"] == 2 and done["train_loss"] == pytest.approx(last_train["train_loss"])
    assert done["tokens_per_s"] == pytest.approx(last_train["tokens_per_s"]) and done["tokens_per_s"] > 0
    assert done["val_loss"] == pytest.approx([r["val_loss"] for r in rows if r["val_loss"] is not None][-1])
    # the rows are metrics.csv's, as numbers: steps 0 (validation before training), 1, 2
    text = (trained["runs"] / "done" / "metrics.csv").read_text().splitlines()
    assert len(text) - 1 == len(rows) and sorted({r["step"] for r in rows}) == [0, 1, 2]
    assert all(r["train_loss"] is None for r in rows if r["step"] == 0)
    detail = c.get("/api/runs/done").json()
    assert detail["config"]["max_steps"] == 2 and detail["row_count"] == len(rows)
    assert c.get("/api/runs/nothing-here").status_code == 404


def test_statuses_of_runs_started_elsewhere(trained, tmp_path):
    runs = tmp_path / "runs"
    for name in ("stopped", "failed", "running"):
        (runs / name).mkdir(parents=True)
        (runs / name / "config.json").write_text(json.dumps({"max_steps": 10}))
    (runs / "stopped" / "last.ckpt").write_bytes(b"")
    (runs / "running" / "metrics.csv").write_text("step,train_loss,val_loss,lr,tokens_per_s,tokens\n"
                                                  "1,3.0,,0.01,100.0,200\n2,2.5,,0.01,100.0,400\n")
    (runs / "not-a-run").mkdir()  # no config.json: not listed
    (runs / "finished" / "final").mkdir(parents=True)  # a run that ended: its lock file stays, nobody holds it
    (runs / "finished" / "config.json").write_text("{}")
    (runs / "finished" / ".rwkv-lora-train.lock").write_text(f"{os.getpid()}\n")
    c = TestClient(make_app(trained["tmp"], runs_dir=runs))
    with OutDirLock(runs / "running"):  # the trainer's own lock, as a run started from the command line holds it
        got = {r["name"]: r for r in c.get("/api/runs").json()}
    assert {n: r["status"] for n, r in got.items()} == {"stopped": "stopped", "failed": "failed", "running": "running",
                                                         "finished": "finished"}
    # 8 steps to go at 200 tokens a step and 100 tokens/s
    assert got["running"]["step"] == 2 and got["running"]["eta_s"] == pytest.approx(16.0)


def test_a_damaged_metrics_file_costs_only_its_bad_lines(trained, tmp_path):
    runs = tmp_path / "runs"
    for name in ("damaged", "fine"):
        (runs / name).mkdir(parents=True)
        (runs / name / "config.json").write_text(json.dumps({"max_steps": 10}))
        (runs / name / "metrics.csv").write_text("step,train_loss,val_loss,lr,tokens_per_s,tokens\n"
                                                 "1,3.0,,0.01,100.0,200\n")
    with open(runs / "damaged" / "metrics.csv", "a") as f:  # a field past csv's 128 KiB limit, then a good row
        f.write('2,"' + "9" * 200_000 + '",,0.01,100.0,400\n3,2.0,,0.01,100.0,600\n')
    c = TestClient(make_app(trained["tmp"], runs_dir=runs))
    got = {r["name"]: r for r in c.get("/api/runs").json()}
    assert set(got) == {"damaged", "fine"} and got["fine"]["step"] == 1
    rows = c.get("/api/runs/damaged").json()["rows"]
    assert [r["step"] for r in rows][0] == 1 and rows[-1]["step"] == 3 and rows[-1]["train_loss"] == 2.0


def test_traversal_and_links_out_are_refused(trained, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "config.json").write_text(json.dumps({"max_steps": 1}))
    (outside / "secret.csv").write_text("step,train_loss\n1,0.5\n")
    runs = tmp_path / "runs"
    (runs / "ok").mkdir(parents=True)
    (runs / "ok" / "config.json").write_text(json.dumps({"max_steps": 1}))
    (runs / "ok" / "metrics.csv").symlink_to(outside / "secret.csv")  # a file linking out: not read
    (runs / "link-out").symlink_to(outside, target_is_directory=True)  # a run linking out: not listed, not served
    c = TestClient(make_app(trained["tmp"], runs_dir=runs))
    assert [r["name"] for r in c.get("/api/runs").json()] == ["ok"]
    ok = c.get("/api/runs/ok").json()
    assert ok["rows"] == [] and ok["step"] == 0
    for name in ("link-out", "..", "..%2F..%2Fetc", "%2Fetc", ".hidden"):
        r = c.get(f"/api/runs/{name}")
        assert r.status_code in (400, 404), (name, r.status_code)
        assert "secret" not in r.text and str(outside) not in r.text
    assert c.get("/api/runs/link-out").status_code == 404


def test_training_is_refused_without_allow_train(trained):
    c = client(trained)
    assert c.get("/api/config").json()["allow_train"] is False
    r = c.post("/api/runs", json={"name": "x", "recipe": "demo", "overrides": []})
    assert r.status_code == 403 and "allow-train" in r.text
    assert c.post("/api/runs/done/stop").status_code == 403
    assert not (trained["runs"] / "x").exists()


def test_bad_start_requests_are_refused(trained):
    c = client(trained, allow_train=True)
    recipes = [r["name"] for r in c.get("/api/config").json()["recipes"]]
    assert "demo" in recipes and "rwkv7-novel" in recipes
    for body, code, words in [
        ({"name": "x", "recipe": "../recipes/demo"}, 400, "not a recipe"),
        ({"name": "x", "recipe": "/etc/passwd"}, 400, "not a recipe"),
        ({"name": "../x", "recipe": "demo"}, 400, "run name"),
        ({"name": "done", "recipe": "demo"}, 409, "exists already"),
        ({"name": "x", "recipe": "demo", "overrides": ["out_dir=/tmp/elsewhere"]}, 400, "out_dir"),
        ({"name": "x", "recipe": "demo", "overrides": ["no_such_key=1"]}, 400, "not a config key"),
        ({"name": "x", "recipe": "demo", "overrides": ["max_steps"]}, 400, "key=value"),
        ({"name": "x", "recipe": "demo", "overrides": ["max_steps=1"] * 65}, 400, "overrides"),
        ({"name": "x", "recipe": "demo", "overrides": ["\ud800=1"]}, 400, "not valid text"),  # JSON's lone surrogate
        ({"name": "x", "recipe": "demo", "overrides": ["max_steps=\ud800"]}, 400, "not valid text"),
    ]:
        # json.dumps escapes a lone surrogate as \ud800, as a browser's JSON.stringify does
        r = c.post("/api/runs", content=json.dumps(body), headers={"content-type": "application/json"})
        assert r.status_code == code and words in r.text, (body, r.status_code, r.text)
    assert c.post("/api/runs/done/stop").status_code == 409  # not started by this server: never signalled
    assert not (trained["runs"] / "x").exists()


def wait_for(predicate, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.3)


@pytest.mark.slow  # a real trainer subprocess: ~20 s on an idle machine, a minute on a loaded one
def test_start_and_stop_a_run(trained):
    """A real trainer subprocess from the demo recipe (overridden onto the tiny inputs): it trains, the stop button's
    SIGTERM makes it save a resumable last.ckpt, and the page is told so in the trainer's own words."""
    c = client(trained, allow_train=True)
    over = [f"model={trained['ckpt']}", f"data={trained['data']}", "val_data=null", "tokenizer=null", "ctx_len=16",
            "micro_bsz=2", "max_steps=100000", "save_every=0", "val_every=0", "lora.r=2", "lora.alpha=4"]
    r = c.post("/api/runs", json={"name": "live", "recipe": "demo", "overrides": over})
    assert r.status_code == 200, r.text
    run_dir = trained["runs"] / "live"
    # listed at once as running, before the trainer has made its directory: the page keeps refreshing from the start
    assert next(x for x in c.get("/api/runs").json() if x["name"] == "live")["status"] == "running"
    try:
        live = wait_for(lambda: next((x for x in c.get("/api/runs").json() if x["name"] == "live" and x["step"] >= 2),
                                     None))
        assert live["status"] == "running" and live["stoppable"] and live["eta_s"] > 0 and live["max_steps"] == 100000
        assert c.post("/api/runs", json={"name": "live", "recipe": "demo"}).status_code == 409
        assert c.post("/api/runs/live/stop").json()["status"] == "stopping"
        stopped = wait_for(lambda: (x := c.get("/api/runs/live").json())["status"] != "running" and x)
    finally:
        proc = c.app.state.web_runs.started["live"].proc
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    assert stopped["status"] == "stopped" and not stopped["stoppable"], stopped
    assert stopped["error"].startswith("rwkv-lora train: stopped by SIGTERM at step ")
    assert stopped["error"].endswith("last.ckpt holds it (continue with --resume true)")
    assert (run_dir / "last.ckpt").is_file() and not (run_dir / "final").exists()


def test_a_failing_run_shows_the_trainers_error(trained):
    c = client(trained, allow_train=True)
    missing = trained["tmp"] / "missing.pth"
    r = c.post("/api/runs", json={"name": "broken", "recipe": "demo", "overrides": [f"model={missing}"]})
    assert r.status_code == 200, r.text
    failed = wait_for(lambda: (x := c.get("/api/runs/broken").json())["status"] != "running" and x)
    assert failed["status"] == "failed"
    assert failed["error"].startswith("rwkv-lora train: error: ") and str(missing) in failed["error"]


def test_every_data_route_needs_the_key_but_the_page_does_not(trained):
    c = client(trained, api_key=KEY)
    for path in ("/api/config", "/api/runs", "/api/runs/done"):
        assert c.get(path).status_code == 401, path
        assert c.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401, path
        assert c.get(path, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200, path
    assert c.post("/api/runs/done/stop").status_code == 401
    page = c.get("/")
    assert page.status_code == 200 and "<canvas" in page.text and "app.js" in page.text
    assert c.get("/app.js").status_code == 200 and c.get("/style.css").status_code == 200
