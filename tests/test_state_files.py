"""State files (`blocks.N.att.time_state`, RWKV-Runner / RWKV-PEFT) and RWKV-7 state tuning, against the `rwkv`
package: a file we export, loaded the way RWKV-Runner loads it, gives the package our model's logits."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import random_rwkv4_state_dict, write_checkpoint
from finetune import cli, load_model
from finetune.train import main as train_main
from finetune.adapter_format import read_adapter, save_state_adapter
from finetune.checkpoint import fingerprint
from finetune.train.config import load_config
from finetune.models import RNNState, get_family
from finetune.models.rwkv7 import config_from_state_dict
from rwkv7_helpers import random_rwkv7_state_dict, rwkv_package_v7
from test_lora import make_corpus

L, C, HEAD, VOCAB = 2, 96, 32, 97  # 3 heads of 32: H != N, so a file with swapped axes cannot pass as right
H = C // HEAD
TOKENS = torch.randint(0, VOCAB, (24,), generator=torch.Generator().manual_seed(7)).tolist()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: a second OpenMP thread only adds barrier waits on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def base_record(sd: dict[str, torch.Tensor], path: Path) -> dict:
    cfg = config_from_state_dict(sd)
    return {"fingerprint": fingerprint(sd), "n_layer": cfg.n_layer, "n_embd": cfg.n_embd,
            "vocab_size": cfg.vocab_size, "dim_ffn": cfg.dim_ffn, "path": str(path)}


def random_state_adapter(sd: dict[str, torch.Tensor], base: Path, out: Path, seed: int,
                         shifts: bool = False) -> Path:
    """A state adapter with a random, non-symmetric WKV state (a transposed file would give other logits)."""
    g = torch.Generator().manual_seed(seed)
    wkv = torch.randn(L, H, HEAD, HEAD, generator=g) * 0.5
    shift = (lambda: torch.randn(L, C, generator=g)) if shifts else (lambda: torch.zeros(L, C))
    meta = {"family": "rwkv7", "base": base_record(sd, base), "tokenizer": None, "kind": "state",
            "recipe": {"test": True}}
    return save_state_adapter(RNNState(shift(), wkv, shift()), out, meta)


def runner_state(file: Path, transpose: bool) -> list[torch.Tensor]:
    """What RWKV-Runner's load_rwkv_state hands the `rwkv` package for a state file: per layer a zero att shift, the
    file's matrix (transposed for v5/v6 models, as it is for v7), a zero ffn shift."""
    raw = torch.load(file, map_location="cpu", weights_only=True)
    state = []
    for i in range(L):
        t = raw[f"blocks.{i}.att.time_state"]
        state += [torch.zeros(C), (t.transpose(1, 2) if transpose else t).float().contiguous(), torch.zeros(C)]
    return state


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("state-files")
    sd = random_rwkv7_state_dict(L, C, VOCAB, HEAD, seed=21)
    base = write_checkpoint(d / "base.pth", sd)
    adapter = random_state_adapter(sd, base, d / "random-state", seed=1)
    return d, sd, base, adapter


@pytest.fixture(scope="module")
def trained(env):
    """State tuning through the trainer (Lightning, train_type: state) on the tiny RWKV-7."""
    d, _, base, _ = env
    data = make_corpus(d / "train", np.tile(np.random.default_rng(0).integers(1, VOCAB, 23), 60), vocab=VOCAB)
    cfg = load_config(None, {"model": str(base), "data": str(data), "out_dir": str(d / "state-run"),
                             "train_type": "state", "ctx_len": 24, "micro_bsz": 4, "max_steps": 30, "lr": 0.05,
                             "lr_final": 0.01, "precision": "32", "seed": 3, "logger": "none"})
    return train_main.main(cfg, quiet=True)


@pytest.fixture(scope="module")
def exported(env, trained):
    """The random and the trained state adapters exported with the CLI, and the `rwkv` package run on each file the
    way RWKV-Runner loads it (plus the random one with v5/v6's transpose, which must not match)."""
    d, sd, _, adapter = env
    files = {"random": d / "random.pth", "trained": d / "trained.pth"}
    assert cli.main(["export-state", str(adapter), "--out", str(files["random"])]) == 0
    assert cli.main(["export-state", trained["final"], "--out", str(files["trained"])]) == 0
    states = [runner_state(files["random"], False), runner_state(files["trained"], False),
              runner_state(files["random"], True)]
    results = rwkv_package_v7([(sd, TOKENS)] * 3, d / "oracle", states=states)
    return files, dict(zip(("random", "trained", "random-transposed"), results))


def plugged_logits(base: Path, adapters: list) -> torch.Tensor:
    model = load_model(base, adapters=adapters)
    with torch.no_grad():
        return model(torch.tensor([TOKENS]))[0]


def test_exported_file_gives_the_package_our_logits(env, exported):
    _, _, base, adapter = env
    files, oracle = exported
    raw = torch.load(files["random"], weights_only=True)
    assert list(raw) == [f"blocks.{i}.att.time_state" for i in range(L)]  # exactly what RWKV-Runner counts
    assert all(t.shape == (H, HEAD, HEAD) and t.dtype == torch.float32 for t in raw.values())
    ours = plugged_logits(base, [adapter])
    torch.testing.assert_close(ours, oracle["random"]["logits"], atol=1e-4, rtol=0)
    # the check can fail: the zero state, or the file read with v5/v6's transpose, give other logits
    assert (plugged_logits(base, []) - oracle["random"]["logits"]).abs().max() > 1e-2
    assert (ours - oracle["random-transposed"]["logits"]).abs().max() > 1e-2
    # after the prompt the package's state is our model's
    model = load_model(base, adapters=[adapter])
    with torch.no_grad():
        _, state = model(torch.tensor([TOKENS]), return_state=True)
    for i in range(L):
        for j, ours_t in enumerate(state.layer(i)):
            torch.testing.assert_close(ours_t[0], oracle["random"]["state"][3 * i + j], atol=1e-4, rtol=1e-4)


def test_import_round_trips(env, exported, tmp_path, capsys):
    _, _, base, adapter = env
    files, _ = exported
    out = tmp_path / "imported"
    assert cli.main(["import-state", str(files["random"]), "--base", str(base), "--out", str(out),
                     "--tokenizer", "world"]) == 0
    original, imported = read_adapter(adapter), read_adapter(out)
    assert imported.kind == "state" and imported.meta.family == "rwkv7" and imported.meta.tokenizer == "world"
    assert imported.meta.base["fingerprint"] == original.meta.base["fingerprint"]
    assert torch.equal(imported.state.wkv, original.state.wkv)
    assert not imported.state.att_shift.any() and not imported.state.ffn_shift.any()
    again = tmp_path / "again.pth"
    assert cli.main(["export-state", str(out), "--out", str(again)]) == 0
    a, b = torch.load(files["random"], weights_only=True), torch.load(again, weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    torch.testing.assert_close(plugged_logits(base, [out]), plugged_logits(base, [adapter]), atol=0, rtol=0)


def test_state_tuning_trains_v7_and_plugs_in(env, trained, exported):
    d, _, base, _ = env
    files, oracle = exported
    losses = [trained["losses"][s] for s in sorted(trained["losses"])]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3, losses
    a = read_adapter(trained["final"])
    assert a.kind == "state" and a.meta.family == "rwkv7"
    assert a.state.wkv.shape == (L, H, HEAD, HEAD) and a.state.wkv.abs().max() > 1e-3
    # RWKV-7 learns the WKV state alone, as RWKV-PEFT does: nothing the state file cannot carry
    assert not a.state.att_shift.any() and not a.state.ffn_shift.any()
    ours = plugged_logits(base, [trained["final"]])
    assert (ours - plugged_logits(base, [])).abs().max() > 1e-2
    torch.testing.assert_close(ours, oracle["trained"]["logits"], atol=1e-4, rtol=0)
    # the same start state through the one-token path (generation) and the window path agree
    model = load_model(base, adapters=[trained["final"]])
    with torch.no_grad():
        first, _ = model.step([TOKENS[0]])
    torch.testing.assert_close(first[0], ours[0], atol=1e-5, rtol=1e-5)


def test_learned_shifts_need_drop_shifts(env, tmp_path, capsys):
    d, sd, base, _ = env
    adapter = random_state_adapter(sd, base, tmp_path / "with-shifts", seed=2, shifts=True)
    out = tmp_path / "state.pth"
    assert cli.main(["export-state", str(adapter), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert "token shifts" in err and "--drop-shifts" in err and len(err.splitlines()) == 1
    assert not out.exists()
    assert cli.main(["export-state", str(adapter), "--out", str(out), "--drop-shifts"]) == 0
    assert "dropped" in capsys.readouterr().out
    raw = torch.load(out, weights_only=True)
    assert torch.equal(torch.stack([raw[f"blocks.{i}.att.time_state"] for i in range(L)]),
                       read_adapter(adapter).state.wkv)


def one_line_error(capsys, argv: list[str], *words: str) -> None:
    assert cli.main(argv) == 1
    cap = capsys.readouterr()
    err = cap.err.strip()
    assert len(err.splitlines()) == 1 and all(w in err for w in words), err


def test_bad_inputs(env, exported, tmp_path, capsys):
    d, sd, base, adapter = env
    files, _ = exported
    good = torch.load(files["random"], weights_only=True)
    out = tmp_path / "adapter"
    # another model's file: fewer layers, or other heads
    fewer = write_checkpoint(tmp_path / "one-layer.pth", {"blocks.0.att.time_state": good["blocks.0.att.time_state"]})
    one_line_error(capsys, ["import-state", str(fewer), "--base", str(base), "--out", str(out)],
                   str(fewer), "blocks.1.att.time_state")
    swapped = write_checkpoint(tmp_path / "swapped.pth", {k: v.reshape(HEAD, H, HEAD) for k, v in good.items()})
    one_line_error(capsys, ["import-state", str(swapped), "--base", str(base), "--out", str(out)],
                   str(swapped), "shape")
    nan = write_checkpoint(tmp_path / "nan.pth", {k: v * float("nan") for k, v in good.items()})
    one_line_error(capsys, ["import-state", str(nan), "--base", str(base), "--out", str(out)], str(nan), "NaN")
    huge = write_checkpoint(tmp_path / "f64.pth", {k: v.double() * 1e300 for k, v in good.items()})  # finite in f64
    one_line_error(capsys, ["import-state", str(huge), "--base", str(base), "--out", str(out)], str(huge),
                   "beyond float32's range")
    # a pickle holding code is never unpickled
    evil = tmp_path / "evil.pth"
    torch.save({"blocks.0.att.time_state": good["blocks.0.att.time_state"], "x": Path("/")}, evil)
    one_line_error(capsys, ["import-state", str(evil), "--base", str(base), "--out", str(out)], str(evil))
    raw_pickle = tmp_path / "raw.pth"
    raw_pickle.write_bytes(pickle.dumps({"a": 1}))
    one_line_error(capsys, ["import-state", str(raw_pickle), "--base", str(base), "--out", str(out)], str(raw_pickle))
    assert not out.exists()
    # RWKV-4 has no state files: neither its state adapters nor its bases
    v4 = write_checkpoint(tmp_path / "v4.pth", random_rwkv4_state_dict(2, 32, 61, seed=1))
    one_line_error(capsys, ["import-state", str(files["random"]), "--base", str(v4), "--out", str(out)],
                   "RWKV-4", "no time_state")
    v4_model = load_model(v4)
    v4_state = save_state_adapter(v4_model.zero_state(1, "cpu").rows(0),
                                  tmp_path / "v4-state", {"family": get_family("rwkv4").name, "base": {}})
    one_line_error(capsys, ["export-state", str(v4_state), "--out", str(tmp_path / "v4.state.pth")], "RWKV-4")
    # outputs: never over an input, never over an existing file without --force, never over a foreign directory
    one_line_error(capsys, ["export-state", str(adapter), "--out", str(files["random"])], "exists", "--force")
    one_line_error(capsys, ["export-state", str(adapter), "--out", str(adapter)], "input")
    before = {p.name: p.read_bytes() for p in Path(adapter).iterdir()}
    one_line_error(capsys, ["export-state", str(adapter), "--out", str(Path(adapter) / "state.safetensors"),
                            "--force"], "inside one")  # not even with --force: a file inside the adapter it reads
    assert {p.name: p.read_bytes() for p in Path(adapter).iterdir()} == before
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"meow")
    one_line_error(capsys, ["import-state", str(files["random"]), "--base", str(base), "--out", str(foreign),
                            "--force"], "did not write")
    assert (foreign / "cat.jpg").read_bytes() == b"meow"
    one_line_error(capsys, ["import-state", str(files["random"]), "--base", str(base), "--out", str(base)], "input")
    assert cli.main(["import-state", str(files["random"]), "--base", str(base), "--out", str(out)]) == 0
    one_line_error(capsys, ["import-state", str(files["random"]), "--base", str(base), "--out", str(out)], "exists")
    assert cli.main(["import-state", str(files["random"]), "--base", str(base), "--out", str(out), "--force"]) == 0


def test_export_state_on_a_full_disk_is_one_line(env, exported, tmp_path):
    import json
    import os
    import subprocess
    import sys

    from test_merge import FULL_DISK_DRIVER, ROOT

    _, _, _, adapter = env
    files, _ = exported
    assert files["random"].stat().st_size > 4096  # beyond the driver's file-size limit
    out = tmp_path / "out"
    out.mkdir()
    commands = [["export-state", str(adapter), "--out", str(out / "s.pth")]]
    env_vars = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", FULL_DISK_DRIVER, json.dumps(commands)], capture_output=True,
                       text=True, env=env_vars)
    assert r.returncode == 0, r.stderr
    [(rc, err)] = json.loads(r.stdout)
    assert rc == 1 and err.count("\n") == 1 and "File too large" in err and "s.pth" in err, err
    assert list(out.iterdir()) == []
