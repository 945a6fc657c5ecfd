"""LitRWKV: the LightningModule. A thin wrapper: the plain RWKV (inside peft for LoRA) does the work; this adds the
loss, the optimizer and schedule, the validation loss, and what last.ckpt holds (only the trained tensors)."""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn as nn

from finetune.train.config import TrainConfig
from finetune.train.loss import Batch, batch_loss_and_count, finite_flag, window_totals
from finetune.train.optim import build_optimizer


RUN_RECORD = "rwkv_lora_run"  # a resumable checkpoint's record: {"base_fingerprint", "lora.init"}
RNG_STATE = "rwkv_lora_rng"  # torch's generators when it was saved: a resumed run draws the dropout masks the
# unbroken run would have drawn (Lightning keeps the step, optimizer and schedule, not the generators)


def run_record(base_fingerprint: str, cfg: TrainConfig) -> dict[str, Any]:
    """What a resumed run must share with the run that saved the checkpoint, beyond its tensors' names and shapes:
    the base (a resumed LoRA on another base of the same shape trains on silently) and how LoRA was initialised
    (pissa rewrites the base under the factors)."""
    return {"base_fingerprint": base_fingerprint, "lora.init": cfg.lora.init}


class LitRWKV(pl.LightningModule):
    """A non-finite loss does not raise in `training_step`: it is recorded (with its micro-batch) and the guard in
    RunCallback stops the run before the optimizer step, on every rank at once, so that no rank waits forever in a
    collective."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, record: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.record = dict(record or {})  # saved in every resumable checkpoint: what its tensors' shapes cannot say
        self.strict_loading = False  # checkpoints hold only the trained tensors
        self.check_grads = cfg.precision != "16-mixed"  # the fp16 grad scaler skips inf steps by itself
        # (loss, trained tokens) of the step's micro-batches with a finite loss, read by `check_step`
        self.step_losses: list[tuple[float, float]] = []
        self.pending: list[tuple[torch.Tensor, Batch]] = []  # (loss, micro-batch) since the last check
        self.nonfinite_loss: float | None = None
        self.bad_batch: Batch | None = None  # the micro-batch that gave the non-finite loss
        self.last_batch: Batch | None = None
        self.last_val_loss: float | None = None
        self._val = [0.0, 0.0]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss, count = batch_loss_and_count(self.model, batch, self.cfg)
        self.last_batch = batch
        # not read here: on a GPU, reading it would wait for the forward pass before the backward pass is queued
        self.pending.append((loss.detach(), count.detach(), batch))
        return loss

    def check_step(self) -> bool:
        """After the backward passes of a step, before its optimizer step: reads the micro-batches' losses into
        `step_losses` (a non-finite one into `nonfinite_loss` / `bad_batch`) and returns whether the gradients are
        finite (True when `check_grads` is off). One device-to-host copy for all of it: each read waits for the
        device to finish the work queued so far."""
        pending, self.pending = self.pending, []
        grads = [p.grad for p in self.trainable() if p.grad is not None] if self.check_grads else []
        flag = finite_flag(grads)
        parts = [t.float().reshape(1) for loss, count, _ in pending for t in (loss, count)]
        if flag is not None:
            parts.append(flag.float().reshape(1))
        device = parts[0].device if parts else None
        values = torch.cat([x.to(device) for x in parts]).tolist() if parts else []
        for value, count, (_, _, batch) in zip(values[0::2], values[1::2], pending):
            if math.isfinite(value):
                self.step_losses.append((value, count))
            elif self.nonfinite_loss is None:
                self.nonfinite_loss, self.bad_batch = value, batch
        return flag is None or values[-1] == 1.0

    def step_loss(self) -> float | None:
        """The step's training loss per trained token (micro-batches weighted by their trained tokens; one without
        any, all prompt in an instruction corpus, adds nothing), or None when the step had no trained token."""
        tokens = sum(count for _, count in self.step_losses)
        return sum(loss * count for loss, count in self.step_losses) / tokens if tokens else None

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        total, count = window_totals(self.model, batch, self.cfg)
        self._val[0] += total.item()
        self._val[1] += count.item()

    def on_validation_epoch_start(self) -> None:
        self._val = [0.0, 0.0]

    def on_validation_epoch_end(self) -> None:
        val = self._val[0] / max(self._val[1], 1.0)
        self.last_val_loss = val
        self.log("val_loss", val, prog_bar=True, logger=False, sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        opt, sched = build_optimizer(self.trainable(), self.cfg)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """The step, then the gradients freed at once: Lightning zeroes them only after the next forward pass, so
        they would sit through it (LoRA r=64 on a 1.5B RWKV-7: 0.23 GB of the peak). DeepSpeed's engine keeps its
        own gradient buffers and zeroes them itself."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if not self.cfg.deepspeed:
            optimizer.zero_grad(set_to_none=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint[RUN_RECORD] = self.record
        checkpoint[RNG_STATE] = {"cpu": torch.get_rng_state(),
                                 "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        rng = checkpoint.get(RNG_STATE)
        if not isinstance(rng, dict):  # a checkpoint from before the generators were saved
            return
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])
