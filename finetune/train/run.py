"""A run's state and outputs: its out_dir (checked, locked), the adapters and checkpoints it saves, last.ckpt, and
the non-finite guard's decision of what to keep.

out_dir holds `step-N/` and `final/` (adapter directories, or `model.pth` for method full), `last.ckpt` (resumable:
only the trained tensors, the optimizer, the schedule and the loop counters; written at every save point and at the
last step, so a finished run can be continued with a larger max_steps), `metrics.csv`, `loss.png`, `config.json`
and the lock file. Only weights verified finite (their tensors, and their outputs on a real batch) are ever saved
or named as "the last good weights".
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn as nn
from pytorch_lightning.plugins import TorchCheckpointIO

from finetune.adapter_format import save_state_adapter
from finetune.adapters import save_adapter
from finetune.atomic import atomic_file, replace_dir, write_error
from finetune.checkpoint import save_checkpoint
from finetune.errors import FinetuneError, first_line
from finetune.infctx import StateTune
from finetune.train.config import TrainConfig
from finetune.train.distributed import env_rank_zero, gathered
from finetune.train.loss import Batch, outputs_finite, tensors_finite
from finetune.train.module import RUN_RECORD, LitRWKV
from finetune.train.layout import CONFIG_JSON, LAST_CKPT, LOCK_FILE  # noqa: F401  (re-exported)
from finetune.train.report import METRICS_CSV, MetricsLog
from finetune.train.signals import StopSignals

# what a run writes into out_dir besides weights (a fresh run accepts an out_dir holding only these)
RUN_FILES = (CONFIG_JSON, METRICS_CSV, "loss.png", LOCK_FILE)


@dataclass
class Run:
    cfg: TrainConfig
    model: nn.Module  # the peft model (lora), the RWKV itself (full), or StateTuned (state)
    base: nn.Module  # the RWKV inside
    meta: dict[str, Any]  # what the adapters record (base, tokenizer, LoRA settings, recipe)
    train_data: Any  # finetune.data.WindowDataset
    val_data: Any  # WindowDataset or None
    out_dir: Path
    resume_from: Path | None
    resume_step: int = 0
    tune: StateTune | None = None  # train_type state: the trained start state
    last_logged: int = -1
    results: dict[str, Any] = field(default_factory=dict)
    trainer: pl.Trainer | None = None
    lit: LitRWKV | None = None
    signals: StopSignals | None = None
    metrics: MetricsLog | None = None
    last_good: tuple[int, Path] | None = None  # the latest saved weights verified finite: (step, path)

    @property
    def is_zero(self) -> bool:
        """Global rank 0 (read from the trainer once launched: before `fit` every process thinks it is rank 0)."""
        return self.trainer.is_global_zero if self.trainer is not None else env_rank_zero()

    def saved_params(self) -> list[nn.Parameter]:
        """What a save reads: the trained tensors, or every weight for method full."""
        if self.cfg.method == "full":
            return list(self.base.parameters())
        return [p for p in self.model.parameters() if p.requires_grad]

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """A row of metrics.csv and the other loggers (wandb), from rank 0."""
        if not self.is_zero:
            return
        if self.metrics is not None:
            self.metrics.log(step, metrics)
        if self.trainer is not None:
            for lg in self.trainer.loggers:
                lg.log_metrics(metrics, step=step)

    # ---- saving

    def save_weights(self, name: str) -> Path:
        """An adapter directory (lora, state) or a full checkpoint (full) under out_dir/name, the same whatever the
        strategy: sharded (ZeRO-3) tensors are gathered first (every rank takes part), then rank 0 writes."""
        with gathered(self.saved_params()):
            if not self.is_zero:
                return self.out_dir / name
            if self.tune is not None:
                return save_state_adapter(self.tune().detach(), self.out_dir / name, self.meta)
            if self.cfg.method == "full":
                path = self.out_dir / name / "model.pth"
                try:
                    save_checkpoint(self.base, path)
                except RuntimeError as e:  # how torch's zip writer reports a short write (full disk, size limit)
                    raise write_error(path, e) from None
                return path
            return save_adapter(self.model, self.out_dir / name, self.meta)

    def save_resumable(self, trainer: pl.Trainer) -> Path:
        """out_dir/last.ckpt, atomically: written under a temporary name (removed if the write fails), then renamed.
        Every rank takes part (DeepSpeed writes a sharded directory, each rank its shards)."""
        dest = self.out_dir / LAST_CKPT
        if type(trainer.strategy).__name__ == "DeepSpeedStrategy":
            # every rank writes into the same directory: a name all of them know, in atomic.py's pattern so that
            # remove_stale_temps finds it after a kill
            tmp = self.out_dir / f".{LAST_CKPT}.dir-step{trainer.global_step}.tmp"
            trainer.save_checkpoint(str(tmp))
            if trainer.is_global_zero:
                os.sync()  # DeepSpeed's files, all of them, on disk before the rename
                replace_dir(tmp, dest)
        elif trainer.is_global_zero:
            with atomic_file(dest) as tmp:
                trainer.save_checkpoint(tmp)
        else:
            trainer.save_checkpoint(str(dest))  # a collective: only rank 0 writes
        return dest

    # ---- the non-finite guard

    def weights_good(self, trainer: pl.Trainer, lit: LitRWKV, batch: Batch) -> bool:
        """The trained tensors are finite and so are the outputs on `batch`, on every rank."""
        with trainer.precision_plugin.val_step_context():
            ok = tensors_finite(self.saved_params()) and outputs_finite(lit.model, batch, self.cfg)
        return trainer.strategy.reduce_boolean_decision(ok, all=True)

    def save_point(self, trainer: pl.Trainer, lit: LitRWKV, batch: Batch, step: int, weights: bool) -> None:
        """Verify the weights after `step`, then save the step adapter (when `weights`) and last.ckpt. Weights that
        give non-finite outputs are never saved: the guard stops the run instead."""
        if not self.weights_good(trainer, lit, batch):
            raise self.non_finite_stop(trainer, lit, f"the weights after step {step} give non-finite outputs",
                                       weights_bad=True)
        if weights:
            self.last_good = (step, self.save_weights(f"step-{step}"))
        self.save_resumable(trainer)

    def non_finite_stop(self, trainer: pl.Trainer, lit: LitRWKV, what: str, weights_bad: bool = False
                        ) -> FinetuneError:
        """The guard's end: the current weights are kept (saved as step-N) only if verified finite on the batch
        that failed; otherwise the message points at the last verified save, if any, and says what to change."""
        step = trainer.global_step
        parts = [what + (" (not saved)" if weights_bad else "")]
        verified = False
        if not weights_bad and step > 0:
            # checked on the micro-batch that failed: outputs that are finite elsewhere prove nothing
            batch = lit.bad_batch if lit.bad_batch is not None else lit.last_batch
            verified = batch is not None and self.weights_good(trainer, lit, batch)
            if not verified:
                parts.append(f"the weights after step {step} give non-finite outputs (not saved)")
        if verified:
            if self.last_good is None or self.last_good[0] != step:
                self.last_good = (step, self.save_weights(f"step-{step}"))
            parts.append(f"the last good weights (step {step}) are in {self.last_good[1]}")
        elif self.last_good is not None:
            parts.append(f"the last good weights (step {self.last_good[0]}) are in {self.last_good[1]}")
        elif step == 0:
            parts.append("nothing was trained yet")
        else:
            parts.append("no earlier weights were saved (set save_every to keep verified ones along the way)")
        advice = ("use precision bf16-mixed (fp16 overflows), lower lr or set grad_clip"
                  if self.cfg.precision == "16-mixed" else "lower lr or set grad_clip")
        return FinetuneError(f"training stopped: {'; '.join(parts)}. To avoid it: {advice}")


class DirectCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer without its in-memory copies: Lightning serialises a checkpoint into a BytesIO
    and writes `getvalue()`, so the LoRA weights and optimizer state are in memory three times while last.ckpt is
    written (+340 MB peak for a 0.1B RWKV-7 with an r=64 adapter; ~2 GB at 1.5B). `Run.save_resumable` already
    writes into `atomic_file`'s temporary path (fsync'ed and renamed after), so the atomicity lives there."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        with open(path, "wb") as f:
            try:
                torch.save(checkpoint, f)
            except RuntimeError as e:  # torch's zip writer reports a failed write so; the OSError (a full disk) is
                if isinstance(e.__context__, OSError):  # what atomic_file makes its one-line error of
                    raise e.__context__ from None
                raise


# ----------------------------------------------------------------------------------------------------------------------
# out_dir: what may be written there, and by whom


class OutDirLock:
    """An exclusive `flock` on out_dir/.rwkv-lora-train.lock for the life of a run: a second run on the same out_dir
    fails at once instead of interleaving its outputs. The kernel drops the lock when the process ends, however it
    ends, so a killed run never leaves a stale lock; the file itself stays (removing it could let two runs lock two
    different files)."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> "OutDirLock":
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise write_error(self.path, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise FinetuneError(f"{self.out_dir}: another training run{who} is using this out_dir; wait for it to "
                                f"finish or choose another out_dir") from None
        try:  # the holder's pid, for the message above; the lock does not depend on it
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:
            pass
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None


def _is_temp(name: str) -> bool:
    # finetune.atomic's temporary names (".NAME.file-PID-HEX.tmp", ...), which remove_stale_temps clears
    return name.startswith(".") and name.endswith(".tmp")


def check_out_dir(out_dir: Path, resume: bool) -> Path | None:
    """The resumable checkpoint to continue from (resume), or None for a fresh run, which needs an out_dir that is
    new, empty, or holds only what a run that never reached a save point leaves (config.json, metrics.csv, ...):
    trained weights, and anyone else's files, are never written over."""
    last = out_dir / LAST_CKPT
    if resume:
        if not last.exists():  # a file, or a directory under DeepSpeed
            raise FinetuneError(f"{last}: nothing to resume (no checkpoint in out_dir)")
        return last
    if not out_dir.exists():
        return None
    if not out_dir.is_dir():
        raise FinetuneError(f"{out_dir}: out_dir exists and is not a directory")
    entries = sorted(p.name for p in out_dir.iterdir() if not _is_temp(p.name))
    if LAST_CKPT in entries:
        raise FinetuneError(f"{out_dir}: holds a run already ({LAST_CKPT}); pass --resume true to continue it or "
                            f"choose another out_dir")
    weights = [n for n in entries if n == "final" or n.startswith("step-")]
    if weights:
        raise FinetuneError(f"{out_dir}: holds trained weights of an earlier run ({weights[0]}); choose another "
                            f"out_dir, or move them away to start over here")
    foreign = [n for n in entries if n not in RUN_FILES]
    if foreign:
        raise FinetuneError(f"{out_dir}: holds files a training run did not write ({foreign[0]}); choose a new or "
                            f"empty out_dir")
    return None


# ----------------------------------------------------------------------------------------------------------------------
# resumable checkpoints


def _load_safely(path: Path) -> Any:
    """torch.load with weights_only=True (no code is ever unpickled) and mmap (nothing is read but what is looked
    at: a DeepSpeed model-states file can hold the whole base). One line on any failure."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise FinetuneError(f"{path}: cannot read the resumable checkpoint ({first_line(e)}); it is damaged: move "
                            f"it away to start over, or resume from a copy") from None


def checkpoint_step(path: Path) -> int:
    """The optimizer step a resumable checkpoint was taken at: a Lightning file (single device, DDP), or DeepSpeed's
    directory (the step is in its model-states file, with Lightning's other loop state)."""
    path = Path(path)
    if path.is_dir():
        states = sorted(path.rglob("*model_states.pt"))
        if not states:
            raise FinetuneError(f"{path}: a DeepSpeed checkpoint without a model-states file; it is damaged: move it "
                                f"away to start over")
        path = states[0]
    ckpt = _load_safely(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("global_step"), int):
        raise FinetuneError(f"{path}: not a resumable checkpoint of rwkv-lora train (no global_step)")
    return ckpt["global_step"]


def read_resumable(path: Path, expected: dict[str, tuple[int, ...]], cfg: TrainConfig,
                   record: dict[str, Any] | None = None) -> int:
    """Check a resumable checkpoint against this run's trained tensors (names and shapes) and its `run_record`
    (base, lora.init), and return its step. An unreadable file or a run with other settings (lora.r, parts, train
    groups, method, the base model, lora.init) is one line here, not a traceback from inside Lightning nor a run
    that silently continues on another base. DeepSpeed's sharded directories are checked by DeepSpeed when it loads
    them."""
    step = checkpoint_step(path)
    if not path.is_dir():
        ckpt = _load_safely(path)
        state = ckpt.get("state_dict")
        if not isinstance(state, dict):
            raise FinetuneError(f"{path}: not a resumable checkpoint of rwkv-lora train (no state_dict)")
        saved_record = ckpt.get(RUN_RECORD)
        for key, value in (record or {}).items():
            was = saved_record.get(key) if isinstance(saved_record, dict) else None
            if was is not None and was != value:  # checkpoints from before the record: shapes only
                what = "another base model" if key == "base_fingerprint" else f"{key} {was!r} (now {value!r})"
                raise FinetuneError(f"{path}: written by a run with {what}; resume with the run's settings "
                                    f"({path.parent / CONFIG_JSON})")
        saved = {k: tuple(v.shape) for k, v in state.items()}
        for k in sorted(set(saved) | set(expected)):
            if saved.get(k) != expected.get(k):
                there = f"{list(saved[k])}" if k in saved else "absent"
                here = f"{list(expected[k])}" if k in expected else "absent"
                name = k.removeprefix("model.").removeprefix("base_model.model.")
                raise FinetuneError(f"{path}: written by a run with other settings ({name}: {there} in the "
                                    f"checkpoint, {here} now; lora.r, lora.parts, lora.train, method or train_type "
                                    f"changed); resume with the run's settings ({path.parent / CONFIG_JSON})")
    if step > cfg.max_steps:
        raise FinetuneError(f"max_steps: {cfg.max_steps} is below the step of {path} ({step}); set max_steps >= "
                            f"{step} to continue the run")
    return step
