"""`rwkv-lora train` / `python train.py`: LoRA (or full) fine-tuning of an RWKV-4 with PyTorch Lightning.

The shape follows litgpt's finetune scripts:

    setup(config)   check every input (config, checkpoint, data, tokenizer) and build the model, data and Trainer;
                    every user mistake is a one-line FinetuneError here, before any training
    main(run)       run `fit`, then save the final adapter, the validation loss and the loss curve
    fit(run)        the loop: Lightning's Trainer over `LitRWKV` (next-token loss honouring the loss mask), AdamW on
                    the trainable tensors with warmup + cosine/linear decay, and `RunCallback` (progress metrics,
                    step adapters, the resumable `last.ckpt`, the non-finite-loss guard)

Data position: window j of the run is `WindowDataset` item j (deterministic given the seed), and optimizer step s
uses windows s*B .. (s+1)*B-1 (B = micro_bsz * grad_accum * devices). `StepBatchSampler` starts at the window of
the restored step, so a resumed run continues exactly where the checkpoint was taken.

`last.ckpt` is a Lightning checkpoint holding only the trained tensors (not the frozen base), the optimizer, the LR
schedule and the loop counters; it is written at every save point and at the last step (so a finished run can be
continued with a larger max_steps), under a temporary name renamed into place, and loaded with weights_only=True.

Safety: a run holds an exclusive lock on its out_dir; SIGTERM and SIGINT stop it at the next optimizer step with a
resumable last.ckpt (exit status 143 / 130); only weights verified to be finite (their tensors and their outputs on a
real batch) are ever saved or named as "the last good weights".
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from finetune.atomic import atomic_file, remove_stale_temps, replace_dir, write_error
from finetune.config import TrainConfig, load_config
from finetune.errors import FinetuneError, first_line

LAST_CKPT = "last.ckpt"
METRICS_CSV = "metrics.csv"
LOCK_FILE = ".rwkv-lora-train.lock"
# what a training run writes into its out_dir (anything else there is not ours: a fresh run refuses such a directory)
RUN_FILES = ("config.json", METRICS_CSV, "loss.png", LOCK_FILE)


# ----------------------------------------------------------------------------------------------------------------------
# Data access (finetune.data: window j of the run is WindowDataset item j, deterministic given the seed)


def open_corpus(path: str):
    from finetune.data import open_corpus as _open

    return _open(path)


def window_dataset(corpus, ctx_len: int, schedule: str, seed: int, count: int | None = None):
    """`count` windows (all of them when None); item j is the same window whatever `count` is."""
    from finetune.data import WindowDataset

    return WindowDataset(corpus, ctx_len, schedule=schedule, seed=seed, epoch_steps=count)


def corpus_meta(corpus) -> dict | None:
    meta = getattr(corpus, "meta", None)
    return meta if isinstance(meta, dict) else None


class StepBatchSampler(torch.utils.data.Sampler):
    """Micro-batch b on rank r holds windows (b * world + r) * micro_bsz + i; iteration starts at the micro-batch of
    the current optimizer step (`start()`), so a restored run picks up the data where it stopped."""

    def __init__(self, num_batches: int, micro_bsz: int, start, rank=0, world=1) -> None:
        self.num_batches, self.micro_bsz, self.start = num_batches, micro_bsz, start
        self.rank, self.world = rank, world  # ints, or callables read when iteration starts (after the launch)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        rank = self.rank() if callable(self.rank) else self.rank
        world = self.world() if callable(self.world) else self.world
        for b in range(self.start(), self.num_batches):
            first = (b * world + rank) * self.micro_bsz
            yield list(range(first, first + self.micro_bsz))


# ----------------------------------------------------------------------------------------------------------------------
# Loss


def masked_ce(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of mask * cross-entropy, sum of mask), in float32."""
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    m = loss_mask.reshape(-1).float()
    return (ce * m).sum(), m.sum()


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over the unmasked targets: sum(mask * ce) / max(sum(mask), 1)."""
    total, count = masked_ce(logits, targets, loss_mask)
    return total / count.clamp(min=1.0)


def chunked(cfg: TrainConfig, ids: torch.Tensor) -> bool:
    return cfg.train_type == "infctx" or (cfg.train_type == "state" and ids.shape[1] > cfg.chunk_len)


def window_totals(model, batch, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of mask * cross-entropy, sum of mask) for a batch, in one pass or chunk by chunk (train_type infctx, or
    state with windows longer than chunk_len)."""
    ids, targets, mask = batch["input_ids"], batch["targets"], batch["loss_mask"]
    if chunked(cfg, ids):
        from finetune.infctx import chunked_loss

        count = mask.float().sum()
        mean = chunked_loss(model, ids, targets, mask, cfg.chunk_len, checkpoint_chunks=torch.is_grad_enabled())
        return mean * count.clamp(min=1.0), count
    return masked_ce(model(ids), targets, mask)


def lr_lambda(cfg: TrainConfig):
    """Multiplier of `lr` at optimizer step s (0-based): linear warmup, then cosine/linear to lr_final, or flat."""
    floor = cfg.lr_final / cfg.lr if cfg.lr > 0 else 0.0

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        span = max(cfg.max_steps - cfg.warmup_steps - 1, 1)
        t = min((step - cfg.warmup_steps) / span, 1.0)
        if cfg.schedule == "linear":
            return 1.0 + (floor - 1.0) * t
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))

    return f


# ----------------------------------------------------------------------------------------------------------------------
# Guards: finite weights, stop signals, the out_dir lock, metrics.csv


def tensors_finite(params: list[torch.Tensor]) -> bool:
    """Every element of every tensor is finite (one device sync, not one per tensor)."""
    flags = [torch.isfinite(p).all() for p in params if p.numel()]
    return bool(torch.stack(flags).all()) if flags else True


@torch.no_grad()
def outputs_finite(model: torch.nn.Module, batch: dict[str, torch.Tensor], cfg: TrainConfig) -> bool:
    """Whether the model's outputs on `batch` are finite: the logits (one pass), or for chunked training the
    cross-entropy of every position (a non-finite logit makes it non-finite). Run in eval mode (no dropout); the
    caller provides the precision context the weights are used in."""
    was = model.training
    model.eval()
    try:
        ids = batch["input_ids"]
        if chunked(cfg, ids):
            total, _ = window_totals(model, dict(batch, loss_mask=torch.ones_like(batch["loss_mask"])), cfg)
            return bool(torch.isfinite(total))
        return bool(torch.isfinite(model(ids)).all())
    finally:
        model.train(was)


class RunStopped(Exception):
    """SIGTERM or SIGINT stopped the run after saving a resumable last.ckpt; the CLI exits with 128 + signal."""

    def __init__(self, signum: int, step: int, resumable: Path | None) -> None:
        self.signum, self.step, self.resumable = signum, step, resumable
        name = signal.Signals(signum).name
        where = f"{resumable} holds it (continue with --resume true)" if resumable else "nothing was saved"
        super().__init__(f"stopped by {name} at step {step}; {where}")

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class StopSignals:
    """While active, SIGTERM (schedulers, `timeout`, `kill`) and SIGINT (Ctrl+C) do not kill the run: the first one
    is recorded and the run stops at the next optimizer step, after saving a resumable last.ckpt.

    Lightning installs its own SIGTERM handler when `fit` starts (it would end the process with status 0 at the
    next batch, even mid-accumulation); `install()` is called again from the callback's on_train_start to take
    SIGTERM back. Later signals are ignored: the save in progress is atomic, and SIGKILL is always there."""

    HANDLED = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signum

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread; the launcher's main thread has them
        for s in self.HANDLED:
            previous = signal.signal(s, self._handle)
            self._previous.setdefault(s, previous)

    def __enter__(self) -> "StopSignals":
        self.install()
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous = {}


class OutDirLock:
    """An exclusive `flock` on out_dir/.rwkv-lora-train.lock for the life of a run: a second run on the same out_dir
    fails at once instead of interleaving its outputs. The kernel drops the lock when the process ends, however it
    ends, so a killed run never leaves a stale lock; the file itself stays (removing it could let two runs lock two
    different files)."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.path = out_dir / LOCK_FILE
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
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())  # for the message above; a failed write would not matter
        self._fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None


class MetricsLog:
    """out_dir/metrics.csv: one row per logged step, appended as it comes (the file always holds whole rows).

    A failed append (full disk) truncates the file back to its last whole row and raises a one-line error; the
    header is written atomically, so a failure at the start leaves no file. On resume the rows up to the restored
    step are kept (later ones are about to be redone)."""

    COLUMNS = ("step", "train_loss", "val_loss", "lr", "tokens_per_s", "tokens")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = 0

    def start(self, keep_until: int | None = None) -> None:
        rows: list[dict[str, str]] = []
        if keep_until is not None and self.path.is_file():
            with open(self.path, newline="", encoding="utf-8") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step") and int(float(r["step"])) <= keep_until]
        text = ",".join(self.COLUMNS) + "\n" + "".join(
            ",".join(r.get(c) or "" for c in self.COLUMNS) + "\n" for r in rows)
        with atomic_file(self.path) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
        self.size = len(text.encode())

    def log(self, step: int, values: dict[str, float]) -> None:
        unknown = set(values) - set(self.COLUMNS)
        if unknown:
            raise ValueError(f"metrics.csv has no column for {sorted(unknown)}")
        # repr: the shortest text that reads back as the same float
        line = ",".join(str(step) if c == "step" else repr(float(values[c])) if c in values else ""
                        for c in self.COLUMNS) + "\n"
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
        except OSError as e:
            try:
                os.truncate(self.path, self.size)  # drop the partial row
            except OSError:
                pass
            raise write_error(self.path, e) from None
        self.size += len(line.encode())


# ----------------------------------------------------------------------------------------------------------------------
# The Lightning module


def _lit_module_class():
    import pytorch_lightning as pl

    class _LitRWKV(pl.LightningModule):
        """A thin wrapper: the plain RWKV (inside peft for LoRA) does the work; this adds loss, optimizer, schedule.

        A non-finite loss does not raise here: it is recorded and the callback's guard stops the run before the
        optimizer step (on every rank at once, so that no rank waits forever in a collective)."""

        def __init__(self, model: torch.nn.Module, cfg: TrainConfig) -> None:
            super().__init__()
            self.model = model
            self.cfg = cfg
            self.strict_loading = False  # checkpoints hold only the trained tensors
            self.check_grads = cfg.precision != "16-mixed"  # the fp16 grad scaler skips inf steps by itself
            self.step_losses: list[float] = []
            self.nonfinite_loss: float | None = None
            self.bad_batch: dict[str, torch.Tensor] | None = None  # the micro-batch that gave it
            self.last_batch: dict[str, torch.Tensor] | None = None
            self._val = [0.0, 0.0]

        def forward(self, idx):
            return self.model(idx)

        def training_step(self, batch, batch_idx):
            if chunked(self.cfg, batch["input_ids"]):
                total, count = window_totals(self.model, batch, self.cfg)
                loss = total / count.clamp(min=1.0)
            else:
                loss = lm_loss(self.model(batch["input_ids"]), batch["targets"], batch["loss_mask"])
            self.last_batch = batch
            value = loss.detach().item()
            if not math.isfinite(value):
                if self.nonfinite_loss is None:
                    self.nonfinite_loss, self.bad_batch = value, batch
            else:
                self.step_losses.append(value)
            return loss

        def trainable(self):
            return [p for p in self.model.parameters() if p.requires_grad]

        def grads_finite(self) -> bool:
            return tensors_finite([p.grad for p in self.trainable() if p.grad is not None])

        def validation_step(self, batch, batch_idx):
            total, count = window_totals(self.model, batch, self.cfg)
            self._val[0] += total.item()
            self._val[1] += count.item()

        def on_validation_epoch_start(self):
            self._val = [0.0, 0.0]

        def on_validation_epoch_end(self):
            val = self._val[0] / max(self._val[1], 1.0)
            self.last_val_loss = val
            self.log("val_loss", val, prog_bar=True, logger=False, sync_dist=True)

        def configure_optimizers(self):
            decay, no_decay = [], []
            for p in self.trainable():
                (decay if p.dim() == 2 else no_decay).append(p)
            groups = [{"params": decay, "weight_decay": self.cfg.weight_decay},
                      {"params": no_decay, "weight_decay": 0.0}]
            opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=self.cfg.lr, betas=tuple(self.cfg.betas),
                                    eps=self.cfg.eps)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(self.cfg))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

        def on_save_checkpoint(self, checkpoint):
            keep = {n for n, p in self.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    return _LitRWKV


# ----------------------------------------------------------------------------------------------------------------------
# The callback: progress metrics, save points, the non-finite guard and the stop signals


def _callback_class():
    import pytorch_lightning as pl

    class RunCallback(pl.Callback):
        def __init__(self, run: "Run") -> None:
            self.run = run
            self.t_step = None
            self.tok_s = None
            self.history: dict[int, float] = {}
            self.stop_after: int | None = None  # tests: simulate a kill after this step

        def on_train_start(self, trainer, pl_module):
            if self.run.signals is not None:
                self.run.signals.install()  # take SIGTERM back from Lightning (see StopSignals)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if self.t_step is None:
                self.t_step = time.perf_counter()
                pl_module.step_losses = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            """The guard: a non-finite loss or gradient (on any rank) stops the run before the weights change."""
            step = trainer.global_step + 1
            if pl_module.nonfinite_loss is not None:
                what = f"loss is {pl_module.nonfinite_loss} at step {step}"
            elif pl_module.check_grads and not pl_module.grads_finite():
                what = f"non-finite gradient at step {step}"
            else:
                what = None
            if trainer.strategy.reduce_boolean_decision(what is not None, all=False):
                raise self.run.non_finite_stop(trainer, pl_module,
                                               what or f"non-finite loss or gradient at step {step} on another rank")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step
            if step <= max(self.run.last_logged, 0) or not pl_module.step_losses:
                return  # still accumulating (no optimizer step since the last one logged)
            self.run.last_logged = step
            cfg = self.run.cfg
            loss = sum(pl_module.step_losses) / len(pl_module.step_losses)
            pl_module.step_losses = []
            self.history[step] = loss
            dt = time.perf_counter() - self.t_step
            self.t_step = None
            tok = cfg.micro_bsz * cfg.ctx_len * cfg.grad_accum * trainer.world_size
            rate = tok / max(dt, 1e-9)
            self.tok_s = rate if self.tok_s is None else 0.8 * self.tok_s + 0.2 * rate
            # the rate this step used, read from the optimizer (the scheduler moves it after this hook)
            lr = trainer.optimizers[0].param_groups[0]["lr"]
            pl_module.log_dict({"loss": loss, "tok/s": self.tok_s, "lr": lr}, prog_bar=True, logger=False)
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                self.run.log_metrics({"train_loss": loss, "lr": lr, "tokens_per_s": rate, "tokens": step * tok}, step)
            signals = self.run.signals
            stop = trainer.strategy.reduce_boolean_decision(signals is not None and signals.received is not None,
                                                            all=False)
            save_weights = bool(cfg.save_every) and step % cfg.save_every == 0 and step < cfg.max_steps
            if save_weights or stop or step >= cfg.max_steps:
                self.run.save_point(trainer, pl_module, batch, step, weights=save_weights)
            if stop:
                signum = signals.received if signals is not None and signals.received else signal.SIGTERM
                raise RunStopped(signum, step, self.run.out_dir / LAST_CKPT)
            if self.stop_after is not None and step >= self.stop_after:
                raise KilledForTest(step)

        def on_validation_end(self, trainer, pl_module):
            val = trainer.callback_metrics.get("val_loss")  # averaged over the ranks
            if val is not None and not trainer.sanity_checking:
                self.run.log_metrics({"val_loss": float(val)}, trainer.global_step)

    return RunCallback


class KilledForTest(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------------------------------
# setup


@dataclass
class Run:
    cfg: TrainConfig
    model: torch.nn.Module  # the peft model (lora) or the RWKV itself (full)
    base: torch.nn.Module  # the RWKV inside
    meta: dict[str, Any]
    train_data: Any
    val_data: Any
    out_dir: Path
    resume_from: Path | None
    resume_step: int = 0
    last_logged: int = -1
    results: dict[str, Any] = field(default_factory=dict)
    trainer: Any = None
    tune: Any = None  # the StateTune (train_type state)
    signals: StopSignals | None = None
    metrics: MetricsLog | None = None
    last_good: tuple[int, Path] | None = None  # the latest saved weights verified finite: (step, path)

    @property
    def is_zero(self) -> bool:
        """Global rank 0 (read from the trainer once launched: before `fit` every process thinks it is rank 0)."""
        return self.trainer.is_global_zero if self.trainer is not None else _env_rank_zero()

    def saved_params(self) -> list[torch.nn.Parameter]:
        """What a save reads: the trained tensors, or every weight for method full."""
        if self.cfg.method == "full":
            return list(self.base.parameters())
        return [p for p in self.model.parameters() if p.requires_grad]

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """A row of metrics.csv (rank 0) and the other loggers (wandb)."""
        if not self.is_zero:
            return
        if self.metrics is not None:
            self.metrics.log(step, metrics)
        if self.trainer is not None:
            for lg in self.trainer.loggers:
                lg.log_metrics(metrics, step=step)

    def save_weights(self, name: str) -> Path:
        """An adapter directory (lora, state) or a full checkpoint (full) under out_dir/name, the same whatever the
        strategy: sharded (ZeRO-3) tensors are gathered first (every rank takes part), then rank 0 writes."""
        from finetune.distributed import gathered

        with gathered(self.saved_params()):
            if not self.is_zero:
                return self.out_dir / name
            if self.cfg.train_type == "state":
                from finetune.adapters import save_state_adapter

                return save_state_adapter(self.tune().detach(), self.out_dir / name, self.meta)
            if self.cfg.method == "full":
                from finetune.checkpoint import save_checkpoint

                path = self.out_dir / name / "model.pth"
                try:
                    save_checkpoint(self.base, path)
                except RuntimeError as e:  # how torch's zip writer reports a short write (full disk, size limit)
                    raise write_error(path, e) from None
                return path
            from finetune.adapters import save_adapter

            return save_adapter(self.model, self.out_dir / name, self.meta)

    def save_resumable(self, trainer) -> Path:
        """out_dir/last.ckpt, atomically: written under a temporary name (removed if the write fails), then renamed.
        Every rank takes part (DeepSpeed writes a sharded directory, each rank its shards)."""
        dest = self.out_dir / LAST_CKPT
        if type(trainer.strategy).__name__ == "DeepSpeedStrategy":
            # every rank must write into the same directory: a name known to all of them, in atomic.py's pattern so
            # that remove_stale_temps finds it after a kill
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

    def weights_good(self, trainer, lit, batch) -> bool:
        """The trained tensors are finite and so are the outputs on `batch`, on every rank."""
        with trainer.precision_plugin.val_step_context():
            ok = tensors_finite(self.saved_params()) and outputs_finite(lit.model, batch, self.cfg)
        return trainer.strategy.reduce_boolean_decision(ok, all=True)

    def save_point(self, trainer, lit, batch, step: int, weights: bool) -> None:
        """Verify the weights after `step`, then save the step adapter (when `weights`) and last.ckpt. Weights that
        give non-finite outputs are never saved: the guard stops the run instead."""
        if not self.weights_good(trainer, lit, batch):
            raise self.non_finite_stop(trainer, lit, f"the weights after step {step} give non-finite outputs",
                                       weights_bad=True)
        if weights:
            self.last_good = (step, self.save_weights(f"step-{step}"))
        self.save_resumable(trainer)

    def non_finite_stop(self, trainer, lit, what: str, weights_bad: bool = False) -> FinetuneError:
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


def _env_rank_zero() -> bool:
    """Rank 0 as the launcher's environment says (torchrun / Lightning set RANK or NODE_RANK + LOCAL_RANK)."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"]) == 0
    return int(os.environ.get("NODE_RANK", 0)) == 0 and int(os.environ.get("LOCAL_RANK", 0)) == 0


def base_precision_dtype(precision: str) -> torch.dtype:
    return {"32": torch.float32, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}[precision]


def _data_tokenizer(meta: dict | None) -> str | None:
    return meta.get("tokenizer") if meta else None


def check_data(path: str, key: str, cfg: TrainConfig, vocab_size: int, tokenizer_name: str | None):
    """Open a corpus and check it against the model and the tokenizer; returns it."""
    if not path:
        raise FinetuneError(f"{key}: required (a binidx prefix or the PREFIX.json manifest from rwkv-lora prepare)")
    corpus = open_corpus(path)
    meta = corpus_meta(corpus)
    if corpus.num_tokens < cfg.ctx_len + 1:
        raise FinetuneError(f"{path}: {corpus.num_tokens} tokens, fewer than one window of ctx_len + 1 = "
                            f"{cfg.ctx_len + 1}; lower ctx_len or add data")
    top = corpus.max_token_id()
    if top >= vocab_size:
        raise FinetuneError(f"{path}: token id {top} >= the model's vocab_size {vocab_size}; the data was made with "
                            f"another tokenizer ({_data_tokenizer(meta) or 'unknown'})")
    data_tok = _data_tokenizer(meta)
    if tokenizer_name is not None and data_tok is not None and data_tok != tokenizer_name:
        raise FinetuneError(f"{path}: prepared with tokenizer {data_tok!r}, but tokenizer is {cfg.tokenizer!r} "
                            f"({tokenizer_name}); re-run rwkv-lora prepare or fix the tokenizer setting")
    return corpus


def check_base_finite(sd: dict[str, torch.Tensor], path: str) -> None:
    """A base holding NaN or inf trains to NaN whatever the settings: refuse it before training, by name."""
    for k, t in sd.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise FinetuneError(f"{path}: the base checkpoint has non-finite weights ({k} holds NaN or inf); "
                                f"training cannot start from it: use an intact checkpoint")


def check_out_dir(out_dir: Path, resume: bool) -> Path | None:
    """The resumable checkpoint to continue from (resume), or None for a fresh run, which needs an out_dir that is
    new, empty, or holds only what a run that never reached a save point leaves (config.json, metrics.csv, ...):
    trained weights or anyone else's files are never written over."""
    last = out_dir / LAST_CKPT
    if resume:
        if not last.exists():  # a file, or a directory under DeepSpeed
            raise FinetuneError(f"{last}: nothing to resume (no checkpoint in out_dir)")
        return last
    if not out_dir.exists():
        return None
    if not out_dir.is_dir():
        raise FinetuneError(f"{out_dir}: out_dir exists and is not a directory")
    entries = sorted(p.name for p in out_dir.iterdir() if not _is_stale_temp(p.name))
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


def _is_stale_temp(name: str) -> bool:
    # the temporary names of finetune.atomic (".NAME.file-PID-HEX.tmp" ...), which remove_stale_temps clears
    return name.startswith(".") and name.endswith(".tmp")


def read_resumable(path: Path, expected: dict[str, tuple[int, ...]], cfg: TrainConfig) -> int:
    """Check a resumable checkpoint against this run's trained tensors (names and shapes) and return its step.
    An unreadable file or a run with other settings (lora.r, parts, train groups, method) is one line here, not a
    traceback from inside Lightning."""
    if path.is_dir():
        return checkpoint_step(path)  # DeepSpeed's sharded directory: its shapes are checked by DeepSpeed
    try:
        # mmap: nothing is read but the small tensors looked at below
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise FinetuneError(f"{path}: cannot read the resumable checkpoint ({first_line(e)}); it is damaged: move "
                            f"it away to start over, or resume from a copy") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict) or "global_step" not in ckpt:
        raise FinetuneError(f"{path}: not a resumable checkpoint of rwkv-lora train")
    saved = {k: tuple(v.shape) for k, v in ckpt["state_dict"].items()}
    for k in sorted(set(saved) | set(expected)):
        if saved.get(k) != expected.get(k):
            there = f"{list(saved[k])}" if k in saved else "absent"
            here = f"{list(expected[k])}" if k in expected else "absent"
            name = k.removeprefix("model.").removeprefix("base_model.model.")
            raise FinetuneError(f"{path}: written by a run with other settings ({name}: "
                                f"{there} in the checkpoint, {here} now; lora.r, lora.parts, lora.train, method or "
                                f"train_type changed); resume with the run's settings ({path.parent / 'config.json'})")
    step = int(ckpt["global_step"])
    if step > cfg.max_steps:
        raise FinetuneError(f"max_steps: {cfg.max_steps} is below the step of {path} ({step}); set max_steps >= "
                            f"{step} to continue the run")
    return step


def _device_count(devices) -> int:
    if isinstance(devices, int) and devices > 0:
        return devices
    if isinstance(devices, (list, tuple)):
        return max(len(devices), 1)
    return max(torch.cuda.device_count(), 1) if torch.cuda.is_available() else 1


def setup(cfg: TrainConfig, quiet: bool = False) -> Run:
    """Check all inputs and build model and data. Raises FinetuneError (one line) before any training."""
    from finetune.checkpoint import build_from_state_dict, fingerprint, read_state_dict
    from finetune.models import detect

    if not cfg.model:
        raise FinetuneError("model: required (path to a BlinkDL RWKV-4 .pth or .safetensors checkpoint)")
    if not cfg.data:
        raise FinetuneError("data: required (a binidx prefix or the PREFIX.json manifest from rwkv-lora prepare)")
    out_dir = Path(cfg.out_dir)
    if _env_rank_zero():  # other ranks start once rank 0 has begun writing there
        resume_from = check_out_dir(out_dir, cfg.resume)
    else:
        resume_from = out_dir / LAST_CKPT if cfg.resume else None
    if cfg.logger == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise FinetuneError("logger: wandb needs the wandb package (pip install 'rwkv-lora[wandb]'), or use "
                                "logger: csv") from None
    from finetune.distributed import lightning_strategy

    lightning_strategy(cfg)  # DeepSpeed without deepspeed or CUDA: one line now, not a traceback later
    if cfg.val_data is None and cfg.val_every:
        raise FinetuneError("val_every: set, but val_data is null")

    sd = read_state_dict(cfg.model)  # missing / unreadable checkpoint -> one-line error
    family = detect(sd, cfg.model)
    mcfg = family.config_from_state_dict(sd, cfg.model)
    check_base_finite(sd, cfg.model)
    tokenizer_name = None
    if cfg.tokenizer is not None:
        from finetune.tokenizer import load_tokenizer

        try:
            tokenizer_name = load_tokenizer(cfg.tokenizer).name
        except FinetuneError:
            raise
        except Exception as e:
            raise FinetuneError(f"tokenizer: cannot load {cfg.tokenizer!r} ({first_line(e)})") from None
    train_corpus = check_data(cfg.data, "data", cfg, mcfg.vocab_size, tokenizer_name)
    val_corpus = check_data(cfg.val_data, "val_data", cfg, mcfg.vocab_size, tokenizer_name) if cfg.val_data else None

    meta_tok = _data_tokenizer(corpus_meta(train_corpus))
    base_info = {"fingerprint": fingerprint(sd), "n_layer": mcfg.n_layer, "n_embd": mcfg.n_embd,
                 "vocab_size": mcfg.vocab_size, "dim_ffn": mcfg.dim_ffn, "path": str(cfg.model)}
    meta = {"base": base_info, "tokenizer": cfg.tokenizer or meta_tok, "r": cfg.lora.r, "alpha": cfg.lora.alpha,
            "dropout": cfg.lora.dropout, "parts": list(cfg.lora.parts), "train": list(cfg.lora.train),
            "recipe": cfg.to_dict()}
    if cfg.tokenizer is None and meta_tok is None and not quiet:
        print("note: the data has no manifest and no tokenizer is set; the adapter will not record its tokenizer",
              file=sys.stderr)

    torch.manual_seed(cfg.seed)
    base = build_from_state_dict(sd, cfg.model)
    del sd
    base.cast(torch.float32 if cfg.method == "full" else base_precision_dtype(cfg.precision))
    base.gradient_checkpointing = cfg.grad_checkpoint
    tune = None
    if cfg.train_type == "state":
        from finetune.infctx import StateTune, StateTuned

        for p in base.parameters():
            p.requires_grad_(False)
        tune = StateTune(mcfg.n_layer, mcfg.n_embd)
        model = StateTuned(base, tune)
        meta = {"base": base_info, "tokenizer": meta["tokenizer"], "kind": "state", "recipe": cfg.to_dict()}
    elif cfg.method == "full":
        for p in base.parameters():
            p.requires_grad_(True)
        model = base
        meta["kind"] = "full"
    else:
        from finetune.adapters import add_lora, unwrap

        lo = cfg.lora
        model = add_lora(base, r=lo.r, alpha=lo.alpha, dropout=lo.dropout, parts=lo.parts, train=lo.train,
                         use_rslora=lo.use_rslora, init=lo.init)
        base = unwrap(model)
        for p in model.parameters():  # trained tensors always in fp32 (AdamW on bf16 weights loses the updates)
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
    model.train()
    resume_step = 0
    if resume_from is not None:  # the checkpoint must fit this model: checked now, with a one-line error
        expected = {f"model.{n}": tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
        resume_step = read_resumable(resume_from, expected, cfg)
    # the run's windows: micro_bsz * grad_accum * devices per step (devices: upper bound before Lightning says)
    n_windows = cfg.max_steps * cfg.grad_accum * cfg.micro_bsz * _device_count(cfg.devices) * cfg.num_nodes
    train_ds = window_dataset(train_corpus, cfg.ctx_len, cfg.sampling, cfg.seed, n_windows)
    val_ds = (window_dataset(val_corpus, cfg.ctx_len, "random", cfg.seed + 1, cfg.val_samples)
              if val_corpus is not None else None)
    run = Run(cfg=cfg, model=model, base=base, meta=meta, train_data=train_ds, val_data=val_ds, out_dir=out_dir,
              resume_from=resume_from, resume_step=resume_step, tune=tune)
    if not quiet:
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in model.parameters())
        print(f"model: {family.title} {mcfg.n_layer} x {mcfg.n_embd}, vocab {mcfg.vocab_size} ({cfg.model}); training "
              f"{n_train:,} of {n_all:,} parameters ({100 * n_train / n_all:.2f}%, "
              f"{'state tuning' if cfg.train_type == 'state' else cfg.method}"
              f"{', infctx chunks of ' + str(cfg.chunk_len) if cfg.train_type == 'infctx' else ''})")
        print(f"data: {train_corpus.num_tokens:,} tokens ({cfg.data}); {cfg.max_steps} steps x "
              f"{cfg.micro_bsz * cfg.grad_accum} x {cfg.ctx_len} tokens"
              + (f"; resuming from {resume_from} at step {resume_step}" if resume_from else ""))
    return run


# ----------------------------------------------------------------------------------------------------------------------
# fit and main


def _progress_bar():
    from pytorch_lightning.callbacks import TQDMProgressBar

    class Bar(TQDMProgressBar):
        """Lightning's tqdm bar (steps done / total, elapsed < ETA, it/s) named after the job, not 'Epoch 0'."""

        def on_train_epoch_start(self, trainer, *args):
            super().on_train_epoch_start(trainer, *args)
            self.train_progress_bar.set_description("train")

        def init_validation_tqdm(self):
            bar = super().init_validation_tqdm()
            bar.disable = True  # a validation pass is a few windows; its loss shows on the training bar
            return bar

        def get_metrics(self, trainer, pl_module):
            items = super().get_metrics(trainer, pl_module)
            items.pop("v_num", None)
            return items

    return Bar()


def _quiet_lightning() -> None:
    import logging
    import warnings

    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*Experiment logs directory.*")
    warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*`validation_step` but have no `val_dataloader`.*")


def _loggers(cfg: TrainConfig, out_dir: Path):
    """Lightning loggers besides metrics.csv (which MetricsLog writes itself, failure-safe)."""
    if cfg.logger == "wandb":
        from pytorch_lightning.loggers import WandbLogger

        return [WandbLogger(project=cfg.wandb_project, save_dir=str(out_dir), config=cfg.to_dict())]
    return []


def fit(run: Run, stop_after: int | None = None, quiet: bool = False, callbacks: Sequence[Any] = ()):
    """Build the Trainer and run the loop. Returns the callback (its `history` holds step -> train loss).
    `callbacks`: more Lightning callbacks, called after the run's own."""
    import pytorch_lightning as pl

    from finetune.distributed import lightning_strategy

    cfg = run.cfg
    _quiet_lightning()
    lit = _lit_module_class()(run.model, cfg)
    callback = _callback_class()(run)
    callback.stop_after = stop_after
    loggers = _loggers(cfg, run.out_dir)
    val_interval = (cfg.val_every if cfg.val_every else cfg.max_steps) * cfg.grad_accum
    trainer = pl.Trainer(
        accelerator=cfg.accelerator, devices=cfg.devices, strategy=lightning_strategy(cfg), num_nodes=cfg.num_nodes,
        precision=cfg.precision if cfg.precision != "32" else "32-true",
        max_steps=cfg.max_steps, max_epochs=-1, accumulate_grad_batches=cfg.grad_accum,
        gradient_clip_val=cfg.grad_clip, gradient_clip_algorithm="norm",
        logger=loggers or False, callbacks=[callback, *callbacks] + ([] if quiet else [_progress_bar()]),
        enable_progress_bar=not quiet, enable_checkpointing=False,
        log_every_n_steps=cfg.log_every, val_check_interval=val_interval if run.val_data is not None else None,
        check_val_every_n_epoch=None, num_sanity_val_steps=0, limit_val_batches=None if run.val_data else 0,
        use_distributed_sampler=False, deterministic="warn", default_root_dir=str(run.out_dir),
        enable_model_summary=False,
    )
    run.trainer = trainer
    num_batches = cfg.max_steps * cfg.grad_accum
    sampler = StepBatchSampler(num_batches, cfg.micro_bsz, start=lambda: trainer.global_step * cfg.grad_accum,
                               rank=lambda: trainer.global_rank, world=lambda: trainer.world_size)
    if num_batches * cfg.micro_bsz * trainer.world_size > len(run.train_data):
        run.train_data.epoch_steps = num_batches * cfg.micro_bsz * trainer.world_size
    train_loader = torch.utils.data.DataLoader(run.train_data, batch_sampler=sampler, num_workers=cfg.num_workers)
    val_loader = None
    if run.val_data is not None:
        val_loader = torch.utils.data.DataLoader(run.val_data, batch_size=cfg.micro_bsz, shuffle=False)
    if _env_rank_zero():
        run.out_dir.mkdir(parents=True, exist_ok=True)
        if cfg.logger == "csv":
            run.metrics = MetricsLog(run.out_dir / METRICS_CSV)
            run.metrics.start(keep_until=run.resume_step if run.resume_from is not None else None)
    if run.resume_from is not None:
        run.last_logged = run.resume_step
        if not quiet:
            print(f"resuming at step {run.resume_step} of {cfg.max_steps}")
    elif val_loader is not None:  # the loss before any training, for the curve and the summary
        run.results["val_loss_start"] = evaluate(run.model, val_loader, cfg)
        run.log_metrics({"val_loss": run.results["val_loss_start"]}, 0)
    run.lit = lit
    trainer.fit(lit, train_dataloaders=train_loader, val_dataloaders=val_loader,
                ckpt_path=str(run.resume_from) if run.resume_from else None,
                weights_only=True)
    run.results["val_loss"] = getattr(lit, "last_val_loss", None)
    return callback


def checkpoint_step(path: Path) -> int:
    """The optimizer step a resumable checkpoint was taken at: a Lightning file (single device, DDP), or DeepSpeed's
    directory (read from its model-states file; 0 when that cannot be read, which only affects metrics.csv)."""
    path = Path(path)
    if path.is_dir():
        for f in sorted(path.rglob("*model_states.pt")):
            try:
                return int(torch.load(str(f), map_location="cpu", weights_only=False).get("global_step", 0))
            except Exception:
                return 0
        return 0
    return int(torch.load(str(path), map_location="cpu", weights_only=True).get("global_step", 0))


@torch.no_grad()
def evaluate(model, loader, cfg: TrainConfig) -> float:
    was = model.training
    model.eval()
    total = count = 0.0
    dtype = base_precision_dtype(cfg.precision) if cfg.method == "lora" else torch.float32
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        for batch in loader:
            t, c = window_totals(model, {k: v.to(device) for k, v in batch.items()}, cfg)
            total += t.item()
            count += c.item()
    model.train(was)
    return total / max(count, 1.0)


def write_config(cfg: TrainConfig, out_dir: Path) -> None:
    with atomic_file(out_dir / "config.json") as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(cfg.to_dict(), indent=2) + "\n")


def main(cfg: TrainConfig, stop_after: int | None = None, quiet: bool = False,
         callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Train according to `cfg`; returns {"losses": {step: loss}, "val_loss", "final", "seconds", ...}.

    Raises FinetuneError (one line) for anything the user can fix, and RunStopped after SIGTERM / SIGINT."""
    out_dir = Path(cfg.out_dir)
    with contextlib.ExitStack() as stack:
        if _env_rank_zero():  # the other ranks run inside rank 0's lock
            stack.enter_context(OutDirLock(out_dir))
            remove_stale_temps(out_dir)  # a killed run's temporaries: with the lock held, nothing of ours is writing
        run = setup(cfg, quiet=quiet)
        if run.is_zero:
            write_config(cfg, run.out_dir)
        run.signals = stack.enter_context(StopSignals())
        t0 = time.perf_counter()
        callback = fit(run, stop_after=stop_after, quiet=quiet, callbacks=callbacks)
        seconds = time.perf_counter() - t0
        _stop_if_signalled(run)  # last.ckpt is at the final step: resuming writes final/
        final = run.save_weights("final")
        run.results.update(losses=dict(callback.history), final=str(final), seconds=seconds,
                           out_dir=str(run.out_dir))
        if run.is_zero and cfg.logger == "csv":
            png = plot_losses(run.out_dir / METRICS_CSV, run.out_dir / "loss.png")
            run.results["plot"] = str(png) if png else None
        _stop_if_signalled(run)
    if run.is_zero and not quiet:
        print(summary_line(run.results))
        print(f"saved: {final}" + (f", {run.results.get('plot')}" if run.results.get("plot") else ""))
    return run.results


def _stop_if_signalled(run: Run) -> None:
    """A signal that came after the last step check: the outputs are consistent, but the caller asked to stop."""
    if run.signals is not None and run.signals.received is not None:
        raise RunStopped(run.signals.received, run.trainer.global_step, run.out_dir / LAST_CKPT)


def summary_line(results: dict[str, Any]) -> str:
    h = results["losses"]
    steps = sorted(h)
    if steps:
        k = max(1, min(10, len(steps) // 5))
        first = sum(h[s] for s in steps[:k]) / k
        last = sum(h[s] for s in steps[-k:]) / k
        line = f"done: {len(steps)} steps in {results['seconds']:.1f}s; train loss {first:.3f} -> {last:.3f} (mean of {k})"
    else:
        line = f"done in {results['seconds']:.1f}s"
    if results.get("val_loss") is not None:
        start = results.get("val_loss_start")
        line += f"; val loss {'' if start is None else f'{start:.3f} -> '}{results['val_loss']:.3f}"
    return line


def plot_losses(metrics_csv: Path, out_png: Path) -> Path | None:
    """Train (and validation) loss against the step, from metrics.csv; matplotlib's Agg backend, no display."""
    if not metrics_csv.is_file():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[int, float]] = {"train_loss": {}, "val_loss": {}}
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            for key in series:
                if row.get(key) not in (None, "") and row.get("step") not in (None, ""):
                    series[key][int(float(row["step"]))] = float(row[key])
    if not series["train_loss"]:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        if series[key]:
            xs = sorted(series[key])
            ax.plot(xs, [series[key][x] for x in xs], label=label, marker="o" if key == "val_loss" else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        with atomic_file(out_png) as tmp:
            fig.savefig(tmp, dpi=100, format="png")  # the temporary name has no .png suffix to go by
    finally:
        plt.close(fig)
    return out_png


# ----------------------------------------------------------------------------------------------------------------------
# Loading a trained adapter for evaluation (peft's own loader + the tensors trained in full)


def apply_adapter(model: torch.nn.Module, adapter_dir: str | Path):
    """Our RWKV + an adapter directory -> a peft model (unmerged) with the full-trained tensors put in place."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from finetune.adapters import TRAINED_TENSORS, unwrap

    adapter_dir = Path(adapter_dir)
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    full = adapter_dir / TRAINED_TENSORS
    if full.exists():
        base = unwrap(peft_model)
        params = dict(base.named_parameters())
        with torch.no_grad():
            for k, v in load_file(str(full)).items():
                params[k].data = v.to(params[k].dtype)
    return peft_model.eval()


# ----------------------------------------------------------------------------------------------------------------------
# Command line


HELP = """\
Fine-tune an RWKV-4 with LoRA (or in full). Settings come from a YAML recipe and/or --key value overrides
(dotted for the lora section: --lora.r 16; values are YAML scalars: --lora.parts [att,ffn]).

examples:
  rwkv-lora train --config recipes/demo.yaml
  rwkv-lora train --config recipes/novel.yaml --model RWKV-4-Pile-169M.pth --data out/novel.json --max_steps 500
  rwkv-lora train --config recipes/novel.yaml --resume true          # continue a killed run from out_dir/last.ckpt
"""


def _keys_help() -> str:
    from finetune.config import LoRASettings, field_docs

    lines = ["config keys:"]
    for k, doc in field_docs(TrainConfig).items():
        if k != "lora":
            lines.append(f"  {k:16s} {doc}")
    for k, doc in field_docs(LoRASettings).items():
        lines.append(f"  lora.{k:11s} {doc}")
    return "\n".join(lines)


def run_cli(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(HELP + "\n" + _keys_help())
        return 0
    cfg = load_config(None, argv)
    try:
        main(cfg)
    except RunStopped as e:
        if _env_rank_zero():
            print(f"rwkv-lora train: {e}", file=sys.stderr)
        return e.exit_status  # 143 / 130: a `train && merge` pipeline stops here
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune with LoRA (or in full) from a YAML recipe",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False)
    p.add_argument("-h", "--help", action="store_true", help="show the config keys")
    p.set_defaults(func=lambda args: run_cli((["--help"] if args.help else []) + list(args.overrides)),
                   accepts_overrides=True)
