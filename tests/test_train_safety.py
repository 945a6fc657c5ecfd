"""The trainer keeps users' data safe: stop signals, the out_dir lock, last.ckpt at the last step, no temporaries
left behind, one-line errors, and only weights verified finite are ever kept."""

from __future__ import annotations

import csv
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import yaml

from conftest import random_rwkv4_state_dict, write_checkpoint
from finetune import load_model
from finetune.cli import main as cli
from finetune.errors import FinetuneError
from finetune.train.main import main, setup
from finetune.train.run import OutDirLock, checkpoint_step as read_checkpoint_step
from test_lora import VOCAB, config, make_corpus, pattern_tokens, setup_dir  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent


def cli_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def write_recipe(path: Path, tmp: Path, ckpt: Path, data: Path, **over) -> Path:
    values = {"model": str(ckpt), "data": str(data), "out_dir": str(tmp / "run"), "ctx_len": 16, "micro_bsz": 4,
              "max_steps": 6, "lr": 1e-2, "lr_final": 1e-3, "precision": "32", "seed": 3, "logger": "csv",
              "lora": {"r": 4, "alpha": 8}}
    values.update(over)
    path.write_text(yaml.safe_dump(values))
    return path


def metric_rows(out_dir: Path) -> list[dict[str, str]]:
    with open(out_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def train_steps(out_dir: Path) -> list[int]:
    return [int(r["step"]) for r in metric_rows(out_dir) if r["train_loss"]]


def checkpoint_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def last_line(text: str) -> str:
    return [ln for ln in text.splitlines() if ln.strip()][-1]


def kill_inside_a_save(out_dir: Path) -> None:
    """A process SIGKILLed in the middle of atomic.py's writes (a step adapter and last.ckpt): what a kill during a
    save leaves behind."""
    script = ("import os, signal, sys\n"
              "from pathlib import Path\n"
              "from finetune.atomic import atomic_dir, atomic_file\n"
              "out = Path(sys.argv[1])\n"
              "with atomic_dir(out / 'step-9') as d:\n"
              "    (d / 'adapter_model.safetensors').write_bytes(b'half')\n"
              "    with atomic_file(out / 'last.ckpt') as f:\n"
              "        Path(f).write_bytes(b'half')\n"
              "        os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(out_dir)], env=cli_env(), capture_output=True)
    assert proc.returncode == -signal.SIGKILL


# ---- stop signals and the lock ---------------------------------------------------------------------------------------


def test_sigterm_and_sigint_stop_with_a_resumable_checkpoint(tmp_path, capsys):
    """Real training processes get SIGTERM and SIGINT: each saves last.ckpt at its current step, says so in one line
    and exits 143 / 130; a second run on the same out_dir meanwhile fails at once; the SIGTERM'd run resumes and
    gives the losses of a run that was never stopped."""
    ckpt = write_checkpoint(tmp_path / "tiny.pth", random_rwkv4_state_dict(2, 32, VOCAB, seed=1))
    data = make_corpus(tmp_path / "train", pattern_tokens(400))
    common = dict(ctx_len=64, max_steps=100000, schedule="constant", lr=3e-3, log_every=1)
    procs = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        name = sig.name.lower()
        recipe = write_recipe(tmp_path / f"{name}.yaml", tmp_path, ckpt, data, out_dir=str(tmp_path / name), **common)
        err = open(tmp_path / f"{name}.err", "w")
        procs[sig] = (subprocess.Popen([sys.executable, "-m", "finetune.cli", "train", "--config", str(recipe)],
                                       env=cli_env(), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err),
                      recipe, tmp_path / name, err)
    try:
        deadline = time.monotonic() + 600
        for sig, (proc, _, out, _) in procs.items():
            while not ((out / "metrics.csv").is_file() and any(s >= 2 for s in train_steps(out))):
                assert proc.poll() is None, (tmp_path / f"{sig.name.lower()}.err").read_text()[-3000:]
                assert time.monotonic() < deadline
                time.sleep(0.2)
        proc, recipe, out, _ = procs[signal.SIGTERM]
        assert cli(["train", "--config", str(recipe), "--max_steps", "1"]) == 1  # the same out_dir, meanwhile
        err = capsys.readouterr().err
        assert f"another training run (pid {proc.pid}) is using this out_dir" in err and err.count("\n") == 1
        for sig, (proc, *_rest) in procs.items():
            proc.send_signal(sig)
        for sig, (proc, *_rest) in procs.items():
            proc.wait(timeout=300)
    finally:
        for proc, _, _, err in procs.values():
            if proc.poll() is None:
                proc.kill()
            err.close()
    stopped = {}
    for sig, (proc, _, out, _) in procs.items():
        stderr = (tmp_path / f"{sig.name.lower()}.err").read_text()
        assert proc.returncode == 128 + sig, stderr[-3000:]
        assert "Traceback" not in stderr
        line = last_line(stderr)
        prefix = f"rwkv-lora train: stopped by {sig.name} at step "
        assert line.startswith(prefix) and line.endswith(f"{out / 'last.ckpt'} holds it (continue with --resume true)")
        step = int(line[len(prefix):].split(";")[0])
        assert checkpoint_step(out / "last.ckpt") == step >= 2
        assert train_steps(out) == list(range(1, step + 1))
        assert not (out / "final").exists()
        stopped[sig] = step

    _, recipe, out, _ = procs[signal.SIGTERM]
    n = stopped[signal.SIGTERM]
    assert cli(["train", "--config", str(recipe), "--resume", "true", "--max_steps", str(n + 2)]) == 0
    assert train_steps(out) == list(range(1, n + 3)) and (out / "final" / "rwkv_lora.json").is_file()
    ref = main(config(tmp_path, ckpt, data, out_dir=str(tmp_path / "ref"), **dict(common, max_steps=n + 2)),
                    quiet=True)["losses"]
    resumed = {int(r["step"]): float(r["train_loss"]) for r in metric_rows(out) if r["train_loss"]}
    for s in (n + 1, n + 2):
        assert resumed[s] == pytest.approx(ref[s], rel=1e-4), (s, resumed[s], ref[s])


def test_a_locked_out_dir_is_refused_at_once(setup_dir, capsys):
    tmp, ckpt, data, _ = setup_dir
    out = tmp / "run"
    args = ["train", "--model", str(ckpt), "--data", str(data), "--out_dir", str(out), "--max_steps", "1"]
    with OutDirLock(out):
        assert cli(args) == 1
        err = capsys.readouterr().err
        assert err == (f"rwkv-lora train: error: {out}: another training run (pid {os.getpid()}) is using this "
                       f"out_dir; wait for it to finish or choose another out_dir\n")
    with OutDirLock(out):  # released when the run holding it ends
        pass


# ---- last.ckpt at the last step; resume errors; stale temporaries ----------------------------------------------------


def test_a_finished_run_continues_to_a_larger_max_steps(setup_dir, capsys):
    tmp, ckpt, data, _ = setup_dir
    out = tmp / "run"
    cfg = dict(schedule="constant", max_steps=4)
    main(config(tmp, ckpt, data, **cfg), quiet=True)
    assert checkpoint_step(out / "last.ckpt") == 4 and (out / "final").is_dir()
    kill_inside_a_save(out)
    stale = sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp"))
    assert len(stale) == 2 and stale[0].startswith(".last.ckpt.file-") and stale[1].startswith(".step-9.dir-")

    base = ["train", "--model", str(ckpt), "--data", str(data), "--out_dir", str(out), "--ctx_len", "16",
            "--micro_bsz", "4", "--lr", "1e-2", "--precision", "32", "--seed", "3", "--schedule", "constant",
            "--lora.r", "4", "--lora.alpha", "8", "--resume", "true"]
    # one-line refusals, before any training: a smaller max_steps, other LoRA settings, a damaged last.ckpt
    assert cli(base + ["--max_steps", "3"]) == 1
    assert "max_steps: 3 is below the step of" in capsys.readouterr().err
    assert cli(base + ["--max_steps", "6", "--lora.r", "8"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("written by a run with other settings (blocks.0.att.key.lora_A.default.weight: "
                                      "[4, 32] in the checkpoint, [8, 32] now; lora.r, lora.parts") in err
    # another base of the same shape, or another lora.init: shapes cannot tell, the checkpoint's record does
    other = write_checkpoint(tmp / "other.pth", random_rwkv4_state_dict(2, 32, VOCAB, seed=7))
    args = base + ["--max_steps", "6"]
    args[args.index("--model") + 1] = str(other)
    assert cli(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "last.ckpt: written by a run with another base model" in err, err
    assert cli(base + ["--max_steps", "6", "--lora.init", "pissa"]) == 1
    assert "written by a run with lora.init 'default' (now 'pissa')" in capsys.readouterr().err
    for damage in (b"", b"PK\x03\x04 not really a zip"):
        broken = tmp / f"broken{len(damage)}"
        shutil.copytree(out, broken)
        (broken / "last.ckpt").write_bytes(damage)
        args = base + ["--max_steps", "6"]
        args[args.index("--out_dir") + 1] = str(broken)
        assert cli(args) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{broken / 'last.ckpt'}: cannot read the resumable checkpoint" in err

    assert cli(base + ["--max_steps", "6"]) == 0
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # the killed save's leftovers are gone
    assert checkpoint_step(out / "last.ckpt") == 6 and train_steps(out) == [1, 2, 3, 4, 5, 6]
    resumed = {int(r["step"]): float(r["train_loss"]) for r in metric_rows(out) if r["train_loss"]}
    ref = main(config(tmp, ckpt, data, out_dir=str(tmp / "ref"), **dict(cfg, max_steps=6)), quiet=True)["losses"]
    for s in (5, 6):
        assert resumed[s] == pytest.approx(ref[s], rel=1e-5), s


def test_inputs_inside_out_dir_are_refused(setup_dir, capsys):
    """A run writes in out_dir: resuming with `--model out/final/model.pth` would have the final save replace the
    model being read, and a recipe inside out_dir (its own config.json) would be rewritten. Refused before any work."""
    tmp, ckpt, data, _ = setup_dir
    out = tmp / "run"
    (out / "final").mkdir(parents=True)
    inside = out / "final" / "model.pth"
    inside.write_bytes(ckpt.read_bytes())
    (out / "last.ckpt").write_bytes(b"")  # a run to resume (never read: the refusal comes first)
    with pytest.raises(FinetuneError, match=r"model: .*model\.pth is inside out_dir .*run, which this run writes"):
        setup(config(tmp, inside, data, resume=True), quiet=True)
    assert inside.read_bytes() == ckpt.read_bytes()
    recipe = write_recipe(out / "config.yaml", tmp, ckpt, data, out_dir=str(out))
    assert cli(["train", "--config", str(recipe), "--resume", "true"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config: " in err and "is inside out_dir" in err, err


def test_devices_and_nodes_this_machine_cannot_run_are_refused_before_loading(setup_dir, monkeypatch):
    from finetune.train.main import LAUNCHER_VARS

    tmp, ckpt, data, _ = setup_dir
    if torch.cuda.is_available():
        pytest.skip("checks what a machine without a GPU refuses")
    for over, msg in (({"accelerator": "gpu"}, "accelerator: gpu, but torch sees no CUDA GPU"),
                      ({"devices": -1}, "devices: -1 names GPUs"), ({"devices": [0]}, r"devices: \[0\] names GPUs")):
        with pytest.raises(FinetuneError, match=msg):
            setup(config(tmp, ckpt, data, **over), quiet=True)
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(FinetuneError, match="num_nodes: 2 needs a launcher on each node"):
        setup(config(tmp, ckpt, data, num_nodes=2), quiet=True)


def test_the_final_weights_are_validated_whatever_val_every(setup_dir):
    """Lightning validates at multiples of val_every: with max_steps 3 and val_every 2, the last validation would
    be step 2's, reported as the run's; the final weights get their own."""
    tmp, ckpt, data, val = setup_dir
    res = main(config(tmp, ckpt, data, max_steps=3, val_data=str(val), val_every=2), quiet=True)
    rows = [(int(r["step"]), float(r["val_loss"])) for r in metric_rows(tmp / "run") if r["val_loss"]]
    assert [s for s, _ in rows] == [0, 2, 3] and res["val_loss"] == pytest.approx(rows[-1][1])
    assert rows[-1][1] != rows[-2][1]


def test_the_step_loss_counts_trained_tokens_only():
    """A micro-batch with no trained token (all prompt, in an instruction corpus) adds nothing to the step's loss;
    a step made only of such batches has no loss at all (not 0.0, which would read as a perfect model)."""
    from finetune.train.module import LitRWKV

    lit = LitRWKV(torch.nn.Linear(1, 1), config(Path("/tmp"), Path("m"), Path("d")))
    lit.step_losses = [(2.0, 3.0), (0.0, 0.0), (4.0, 1.0)]
    assert lit.step_loss() == pytest.approx((2.0 * 3 + 4.0) / 4)
    lit.step_losses = [(0.0, 0.0), (0.0, 0.0)]
    assert lit.step_loss() is None


def test_out_dirs_holding_other_data_are_refused(setup_dir):
    tmp, ckpt, data, _ = setup_dir
    out = tmp / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FinetuneError, match=r"run: holds files a training run did not write \(notes.txt\)"):
        setup(config(tmp, ckpt, data), quiet=True)
    (out / "notes.txt").unlink()
    (out / "final").mkdir()
    with pytest.raises(FinetuneError, match=r"run: holds trained weights of an earlier run \(final\)"):
        setup(config(tmp, ckpt, data), quiet=True)


# ---- a full disk -----------------------------------------------------------------------------------------------------


def _file_size_limit(limit: int) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))


def test_full_disk_at_the_checkpoint_is_one_line_and_leaves_no_temporaries(setup_dir):
    """No file may grow past 40 kB (the disk is "full" for last.ckpt, ~95 kB): exit 1, one line naming the file,
    no temporary left, metrics.csv intact."""
    tmp, ckpt, data, _ = setup_dir
    recipe = write_recipe(tmp / "r.yaml", tmp, ckpt, data, max_steps=3)
    proc = subprocess.run([sys.executable, "-m", "finetune.cli", "train", "--config", str(recipe)], env=cli_env(),
                          cwd=tmp, capture_output=True, text=True, timeout=600,
                          preexec_fn=lambda: _file_size_limit(40_000))
    out = tmp / "run"
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert last_line(proc.stderr) == (f"rwkv-lora train: error: {out / 'last.ckpt'}: cannot write (File too large; "
                                      f"the previous output, if any, is unchanged)")
    assert sorted(p.name for p in out.iterdir()) == [".rwkv-lora-train.lock", "config.json", "metrics.csv"]
    assert train_steps(out) == [1, 2, 3]


def test_full_disk_at_metrics_csv_keeps_whole_rows(setup_dir):
    tmp, ckpt, data, _ = setup_dir
    out = tmp / "run"
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1500, hard))  # config.json fits; metrics.csv fills up after ~10 rows
    try:
        with pytest.raises(FinetuneError, match=r"metrics.csv: cannot write \(File too large"):
            main(config(tmp, ckpt, data, max_steps=60, lr=1e-3), quiet=True)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    text = (out / "metrics.csv").read_text()
    assert text.endswith("\n") and all(len(line.split(",")) == 6 for line in text.splitlines())
    assert train_steps(out) == list(range(1, len(text.splitlines())))
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


# ---- non-finite values -----------------------------------------------------------------------------------------------


class OverflowAfterStep(pl.Callback):
    """Right after optimizer step `step`, ln_out.weight (trained with lora.train: [ln]) is set to 3e38: every tensor
    is still finite, but the logits overflow to inf/NaN. Hooked on the optimizer so that it happens before the
    run's own end-of-step checks."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step + 1 == self.step:
            weight = next(p for n, p in pl_module.named_parameters() if n.endswith("ln_out.weight"))

            def overflow(opt, args, kwargs):
                with torch.no_grad():
                    weight.fill_(3e38)
                handle.remove()

            handle = optimizer.register_step_post_hook(overflow)


def test_weights_giving_non_finite_logits_are_never_kept(setup_dir):
    tmp, ckpt, data, _ = setup_dir
    # saved every step: the weights after step 3 fail the save's check; step-2 is named, and it is sound
    cfg = config(tmp, ckpt, data, save_every=1, **{"lora.train": ["ln"]})
    with pytest.raises(FinetuneError, match=r"training stopped: the weights after step 3 give non-finite outputs "
                                            r"\(not saved\); the last good weights \(step 2\) are in .*step-2\. To "
                                            r"avoid it: lower lr or set grad_clip$"):
        main(cfg, quiet=True, callbacks=[OverflowAfterStep(3)])
    out = Path(cfg.out_dir)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("step-", "final"))) == ["step-1", "step-2"]
    assert checkpoint_step(out / "last.ckpt") == 2
    with torch.no_grad():
        logits = load_model(ckpt, adapters=[out / "step-2"])(torch.tensor([[1, 2, 3, 4, 5]]))
    assert torch.isfinite(logits).all()
    # no save points: the NaN loss at step 4 is caught, and nothing is named as good
    cfg = config(tmp, ckpt, data, out_dir=str(tmp / "run2"), **{"lora.train": ["ln"]})
    with pytest.raises(FinetuneError, match=r"training stopped: loss is nan at step 4; the weights after step 3 give "
                                            r"non-finite outputs \(not saved\); no earlier weights were saved"):
        main(cfg, quiet=True, callbacks=[OverflowAfterStep(3)])
    assert not [p for p in (tmp / "run2").iterdir() if p.name.startswith(("step-", "final", "last"))]


def test_a_base_with_non_finite_weights_is_refused_by_name(tmp_path):
    sd = random_rwkv4_state_dict(2, 32, VOCAB, seed=1)
    sd["blocks.1.ffn.key.weight"][3, 5] = float("nan")
    ckpt = write_checkpoint(tmp_path / "nan.pth", sd)
    data = make_corpus(tmp_path / "train", pattern_tokens())
    with pytest.raises(FinetuneError, match=r"nan.pth: blocks.1.ffn.key.weight holds NaN or infinite values; the "
                                            r"checkpoint is damaged") as e:
        setup(config(tmp_path, ckpt, data), quiet=True)
    assert "lr" not in str(e.value)


def test_magic_prime_error_names_the_sampling_setting(setup_dir):
    tmp, ckpt, _, _ = setup_dir
    data = make_corpus(tmp / "short", np.arange(1, 31))
    with pytest.raises(FinetuneError, match=r"short.json: too short for sampling: magic_prime at ctx_len 16 .*use "
                                            r"sampling: random"):
        setup(config(tmp, ckpt, data, sampling="magic_prime"), quiet=True)


def test_cli_refuses_an_infinite_learning_rate(setup_dir, capsys):
    tmp, ckpt, data, _ = setup_dir
    args = ["train", "--model", str(ckpt), "--data", str(data), "--out_dir", str(tmp / "run"), "--lr", "inf"]
    assert cli(args) == 1
    assert capsys.readouterr().err == "rwkv-lora train: error: lr: must be a finite number > 0, got inf\n"
    assert not (tmp / "run").exists()  # nothing is created for a refused config


class Payload:
    """Unpickling this would write a marker file: what a malicious pickle in a checkpoint could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_deepspeed_checkpoints_are_read_without_unpickling_code(tmp_path):
    """DeepSpeed's last.ckpt is a directory; its step is read from the model-states file with weights_only=True:
    a Python object in it is refused in one line (and never run), a damaged directory is named, not ignored."""
    ds = tmp_path / "last.ckpt"
    (ds / "checkpoint").mkdir(parents=True)
    states = ds / "checkpoint" / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.zeros(2)}, "global_step": 7, "ds_version": "0.14"}, states)
    assert read_checkpoint_step(ds) == 7
    marker = tmp_path / "marker"
    torch.save({"global_step": 7, "extra": Payload(marker)}, states)
    with pytest.raises(FinetuneError, match=r"mp_rank_00_model_states.pt: cannot read the resumable checkpoint"):
        read_checkpoint_step(ds)
    assert not marker.exists()
    states.write_bytes(b"")
    with pytest.raises(FinetuneError, match=r"mp_rank_00_model_states.pt: cannot read the resumable checkpoint"):
        read_checkpoint_step(ds)
    states.unlink()
    with pytest.raises(FinetuneError, match=r"last.ckpt: a DeepSpeed checkpoint without a model-states file"):
        read_checkpoint_step(ds)
