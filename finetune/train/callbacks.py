"""The run's Lightning callbacks: RunCallback (progress metrics, save points, the non-finite guard, the stop
signals) and ProgressBar (Lightning's tqdm bar, named after the job)."""

from __future__ import annotations

import contextlib
import signal
import time
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import TQDMProgressBar

from finetune.train.loss import Batch
from finetune.train.module import LitRWKV
from finetune.train.run import LAST_CKPT, Run
from finetune.train.signals import RunStopped


class RunCallback(pl.Callback):
    """What happens around each optimizer step.

    Before it (on_before_optimizer_step): the guard. A non-finite loss or gradient on any rank stops the run before
    the weights change; see Run.non_finite_stop for what is kept.
    After it (on_train_batch_end, once per optimizer step): the loss, rate and lr go to the progress bar and
    metrics.csv; at a save point (every save_every steps), at the last step, and when a stop signal came, the
    weights are verified and step-N/ (save points only) and last.ckpt are written; after a signal the run then
    stops with RunStopped."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.t_step: float | None = None
        self.tok_s: float | None = None
        self.history: dict[int, float] = {}
        self.step_lr = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: LitRWKV) -> None:
        if self.run.signals is not None:
            self.run.signals.install()  # take SIGTERM back from Lightning (see StopSignals)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: LitRWKV, batch: Batch, batch_idx: int) -> None:
        if self.t_step is None:
            self.t_step = time.perf_counter()
            pl_module.step_losses = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: LitRWKV,
                                 optimizer: torch.optim.Optimizer) -> None:
        # the rate this step uses (Lightning moves the scheduler on before on_train_batch_end)
        self.step_lr = float(optimizer.param_groups[0]["lr"])
        step = trainer.global_step + 1
        grads_ok = pl_module.check_step()  # reads the step's losses too
        if pl_module.nonfinite_loss is not None:
            what = f"loss is {pl_module.nonfinite_loss} at step {step}"
        elif not grads_ok:
            what = f"non-finite gradient at step {step}"
        else:
            what = None
        if trainer.strategy.reduce_boolean_decision(what is not None, all=False):
            raise self.run.non_finite_stop(trainer, pl_module,
                                           what or f"non-finite loss or gradient at step {step} on another rank")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: LitRWKV, outputs: Any, batch: Batch,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step <= max(self.run.last_logged, 0) or not pl_module.step_losses:
            return  # still accumulating (no optimizer step since the last one logged)
        self.run.last_logged = step
        cfg = self.run.cfg
        loss = pl_module.step_loss()
        pl_module.step_losses = []
        if loss is not None:
            self.history[step] = loss
        dt = time.perf_counter() - (self.t_step or 0.0)
        self.t_step = None
        tok = cfg.micro_bsz * cfg.ctx_len * cfg.grad_accum * trainer.world_size
        rate = tok / max(dt, 1e-9)
        self.tok_s = rate if self.tok_s is None else 0.8 * self.tok_s + 0.2 * rate
        lr = self.step_lr
        trained = {} if loss is None else {"loss": loss}  # a step without a trained token has no loss to show
        pl_module.log_dict({**trained, "tok/s": self.tok_s, "lr": lr}, prog_bar=True, logger=False)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            row = {"lr": lr, "tokens_per_s": rate, "tokens": step * tok}
            self.run.log_metrics(row if loss is None else {"train_loss": loss, **row}, step)
        signals = self.run.signals
        received = signals.received if signals is not None else None
        stop = trainer.strategy.reduce_boolean_decision(received is not None, all=False)  # any rank's signal
        save_weights = bool(cfg.save_every) and step % cfg.save_every == 0 and step < cfg.max_steps
        if save_weights or stop or step >= cfg.max_steps:
            self.run.save_point(trainer, pl_module, batch, step, weights=save_weights)
        if stop:  # a signal that reached another rank only is reported as SIGTERM (what launchers forward)
            raise RunStopped(received if received is not None else signal.SIGTERM, step,
                             self.run.out_dir / LAST_CKPT)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: LitRWKV) -> None:
        val = trainer.callback_metrics.get("val_loss")  # averaged over the ranks
        if val is not None and not trainer.sanity_checking:
            self.run.log_metrics({"val_loss": float(val)}, trainer.global_step)


class ProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar (steps done / total, elapsed < ETA, it/s) named after the job, not 'Epoch 0'."""

    def init_train_tqdm(self) -> Any:
        bar = super().init_train_tqdm()
        bar.set_description("train")  # a resumed run starts mid-epoch: on_train_epoch_start is not called
        return bar

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description("train")

    def init_validation_tqdm(self) -> Any:
        bar = super().init_validation_tqdm()
        bar.disable = True  # a validation pass is a few windows; its loss shows on the training bar
        return bar

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # close the bar now: left open, its last refresh is written at exit, after the CLI's one-line message
        with contextlib.suppress(TypeError):  # no bar yet
            self.train_progress_bar.close()

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items
