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
schedule and the loop counters; it is written to a temporary name and renamed, and loaded with weights_only=True.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from finetune.config import TrainConfig, load_config
from finetune.errors import FinetuneError

LAST_CKPT = "last.ckpt"


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
# The Lightning module


class NonFiniteLoss(RuntimeError):
    pass


def _lit_module_class():
    import pytorch_lightning as pl

    class _LitRWKV(pl.LightningModule):
        """A thin wrapper: the plain RWKV (inside peft for LoRA) does the work; this adds loss, optimizer, schedule."""

        def __init__(self, model: torch.nn.Module, cfg: TrainConfig) -> None:
            super().__init__()
            self.model = model
            self.cfg = cfg
            self.strict_loading = False  # checkpoints hold only the trained tensors
            self.check_grads = cfg.precision != "16-mixed"  # the fp16 grad scaler skips inf steps by itself
            self.step_losses: list[float] = []
            self._val = [0.0, 0.0]

        def forward(self, idx):
            return self.model(idx)

        def training_step(self, batch, batch_idx):
            if chunked(self.cfg, batch["input_ids"]):
                total, count = window_totals(self.model, batch, self.cfg)
                loss = total / count.clamp(min=1.0)
            else:
                loss = lm_loss(self.model(batch["input_ids"]), batch["targets"], batch["loss_mask"])
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f"loss is {loss.item()} at step {self.trainer.global_step + 1}")
            self.step_losses.append(loss.detach().item())
            return loss

        def on_before_optimizer_step(self, optimizer):
            if self.check_grads:
                for p in self.trainable():
                    if p.grad is not None and not torch.isfinite(p.grad).all():
                        raise NonFiniteLoss(f"non-finite gradient at step {self.trainer.global_step + 1}")

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
            if not self.trainer.sanity_checking and self.trainer.is_global_zero:
                log_metrics(self.trainer, {"val_loss": val}, self.trainer.global_step)

        def trainable(self):
            return [p for p in self.model.parameters() if p.requires_grad]

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


def log_metrics(trainer, metrics: dict[str, float], step: int) -> None:
    for lg in trainer.loggers:
        lg.log_metrics(metrics, step=step)


# ----------------------------------------------------------------------------------------------------------------------
# The callback: progress metrics, periodic saving, and the resumable state


def _callback_class():
    import pytorch_lightning as pl

    class RunCallback(pl.Callback):
        def __init__(self, run: "Run") -> None:
            self.run = run
            self.t_step = None
            self.tok_s = None
            self.history: dict[int, float] = {}
            self.stop_after: int | None = None  # tests: simulate a kill after this step
            self.run_lr = lr_lambda(run.cfg)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if self.t_step is None:
                self.t_step = time.perf_counter()
                pl_module.step_losses = []

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
            lr = cfg.lr * self.run_lr(step - 1)  # the rate this step used (the scheduler has moved on)
            pl_module.log_dict({"loss": loss, "tok/s": self.tok_s, "lr": lr}, prog_bar=True, logger=False)
            if trainer.is_global_zero and (step % cfg.log_every == 0 or step == cfg.max_steps):
                log_metrics(trainer, {"train_loss": loss, "lr": lr, "tokens_per_s": rate,
                                      "tokens": step * tok}, step)
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
                self.run.save_weights(f"step-{step}")
                self.run.save_resumable(trainer)
            if self.stop_after is not None and step >= self.stop_after:
                raise KilledForTest(step)

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
    last_logged: int = -1
    results: dict[str, Any] = field(default_factory=dict)
    trainer: Any = None
    tune: Any = None  # the StateTune (train_type state)

    @property
    def is_zero(self) -> bool:
        """Global rank 0 (read from the trainer once launched: before `fit` every process thinks it is rank 0)."""
        return self.trainer.is_global_zero if self.trainer is not None else _env_rank_zero()

    def saved_params(self) -> list[torch.nn.Parameter]:
        """What a save reads: the trained tensors, or every weight for method full."""
        if self.cfg.method == "full":
            return list(self.base.parameters())
        return [p for p in self.model.parameters() if p.requires_grad]

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
                save_checkpoint(self.base, path)
                return path
            from finetune.adapters import save_adapter

            return save_adapter(self.model, self.out_dir / name, self.meta)

    def save_resumable(self, trainer) -> None:
        """out_dir/last.ckpt, atomically: written under a temporary name, then renamed."""
        tmp = self.out_dir / f".{LAST_CKPT}.tmp"
        trainer.save_checkpoint(str(tmp))  # DeepSpeed writes a directory here (its own sharded layout)
        if trainer.is_global_zero:
            dest = self.out_dir / LAST_CKPT
            if tmp.is_dir() or dest.is_dir():
                from finetune.atomic import replace_dir

                replace_dir(tmp, dest)
            else:
                os.replace(tmp, dest)


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


def _device_count(devices) -> int:
    if isinstance(devices, int) and devices > 0:
        return devices
    if isinstance(devices, (list, tuple)):
        return max(len(devices), 1)
    return max(torch.cuda.device_count(), 1) if torch.cuda.is_available() else 1


def setup(cfg: TrainConfig, quiet: bool = False) -> Run:
    """Check all inputs and build model and data. Raises FinetuneError (one line) before any training."""
    from finetune.checkpoint import fingerprint, read_state_dict
    from finetune.models import detect

    if not cfg.model:
        raise FinetuneError("model: required (path to a BlinkDL RWKV-4 .pth or .safetensors checkpoint)")
    if not cfg.data:
        raise FinetuneError("data: required (a binidx prefix or the PREFIX.json manifest from rwkv-lora prepare)")
    out_dir = Path(cfg.out_dir)
    resume_from = None
    if cfg.resume:
        if not (out_dir / LAST_CKPT).exists():  # a file, or a directory under DeepSpeed
            raise FinetuneError(f"{out_dir / LAST_CKPT}: nothing to resume (no checkpoint in out_dir; was save_every "
                                f"set?)")
        resume_from = out_dir / LAST_CKPT
    elif (out_dir / LAST_CKPT).exists():
        raise FinetuneError(f"{out_dir}: holds a run already (last.ckpt); pass --resume true to continue it or "
                            f"choose another out_dir")
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
    tokenizer_name = None
    if cfg.tokenizer is not None:
        from finetune.tokenizer import load_tokenizer

        try:
            tokenizer_name = load_tokenizer(cfg.tokenizer).name
        except FinetuneError:
            raise
        except Exception as e:
            raise FinetuneError(f"tokenizer: cannot load {cfg.tokenizer!r} ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    train_corpus = check_data(cfg.data, "data", cfg, mcfg.vocab_size, tokenizer_name)
    val_corpus = check_data(cfg.val_data, "val_data", cfg, mcfg.vocab_size, tokenizer_name) if cfg.val_data else None

    meta_tok = _data_tokenizer(corpus_meta(train_corpus))
    base_info = {"fingerprint": fingerprint(sd), "n_layer": mcfg.n_layer, "n_embd": mcfg.n_embd,
                 "vocab_size": mcfg.vocab_size, "dim_ffn": mcfg.dim_ffn, "path": str(cfg.model)}
    meta = {"family": family.name, "base": base_info, "base_quant": cfg.base_quant,
            "tokenizer": cfg.tokenizer or meta_tok, "r": cfg.lora.r, "alpha": cfg.lora.alpha,
            "dropout": cfg.lora.dropout, "parts": list(cfg.lora.parts), "train": list(cfg.lora.train),
            "recipe": cfg.to_dict()}
    if cfg.tokenizer is None and meta_tok is None and not quiet:
        print("note: the data has no manifest and no tokenizer is set; the adapter will not record its tokenizer",
              file=sys.stderr)

    torch.manual_seed(cfg.seed)
    from finetune.quant import build_model

    # cast (and for base_quant int8/nf4, quantize) tensor by tensor while building: peak ~ the model as held
    base = build_model(sd, cfg.model, dtype=torch.float32 if cfg.method == "full" else
                       base_precision_dtype(cfg.precision), quant=cfg.base_quant)
    del sd
    base.gradient_checkpointing = cfg.grad_checkpoint
    tune = None
    if cfg.train_type == "state":
        from finetune.infctx import StateTune, StateTuned

        for p in base.parameters():
            p.requires_grad_(False)
        tune = StateTune(base)
        model = StateTuned(base, tune)
        meta = {"family": family.name, "base": base_info, "tokenizer": meta["tokenizer"], "kind": "state", "recipe": cfg.to_dict()}
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
    # the run's windows: micro_bsz * grad_accum * devices per step (devices: upper bound before Lightning says)
    n_windows = cfg.max_steps * cfg.grad_accum * cfg.micro_bsz * _device_count(cfg.devices) * cfg.num_nodes
    train_ds = window_dataset(train_corpus, cfg.ctx_len, cfg.sampling, cfg.seed, n_windows)
    val_ds = (window_dataset(val_corpus, cfg.ctx_len, "random", cfg.seed + 1, cfg.val_samples)
              if val_corpus is not None else None)
    run = Run(cfg=cfg, model=model, base=base, meta=meta, train_data=train_ds, val_data=val_ds, out_dir=out_dir,
              resume_from=resume_from, tune=tune)
    if not quiet:
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in model.parameters())
        print(f"model: {family.title} {mcfg.n_layer} x {mcfg.n_embd}, vocab {mcfg.vocab_size} ({cfg.model}); training "
              f"{n_train:,} of {n_all:,} parameters ({100 * n_train / n_all:.2f}%, "
              f"{'state tuning' if cfg.train_type == 'state' else cfg.method}"
              f"{', infctx chunks of ' + str(cfg.chunk_len) if cfg.train_type == 'infctx' else ''})")
        print(f"data: {train_corpus.num_tokens:,} tokens ({cfg.data}); {cfg.max_steps} steps x "
              f"{cfg.micro_bsz * cfg.grad_accum} x {cfg.ctx_len} tokens"
              + (f"; resuming from {resume_from}" if resume_from else ""))
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
    if cfg.logger == "csv":
        from pytorch_lightning.loggers import CSVLogger

        return [CSVLogger(save_dir=str(out_dir), name="", version="")]
    if cfg.logger == "wandb":
        from pytorch_lightning.loggers import WandbLogger

        return [WandbLogger(project=cfg.wandb_project, save_dir=str(out_dir), config=cfg.to_dict())]
    return []


def _carry_metrics(loggers, path: Path, max_step: int) -> None:
    """On resume: keep metrics.csv's rows up to the checkpoint's step (later ones are about to be redone).
    Lightning's CSV writer deletes an existing file when it starts, so the rows are written back after it has."""
    from pytorch_lightning.loggers import CSVLogger

    if not path.is_file():
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields = list(reader.fieldnames or [])
        rows = [r for r in reader if not r.get("step") or int(float(r["step"])) <= max_step]
    for lg in loggers:
        if isinstance(lg, CSVLogger):
            writer = lg.experiment  # created now: removes the old file
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=fields)
                w.writeheader()
                w.writerows(rows)
            writer.metrics_keys = sorted(fields)


def fit(run: Run, stop_after: int | None = None, quiet: bool = False):
    """Build the Trainer and run the loop. Returns the callback (its `history` holds step -> train loss)."""
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
        logger=loggers or False, callbacks=[callback] + ([] if quiet else [_progress_bar()]),
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
    run.out_dir.mkdir(parents=True, exist_ok=True)
    if run.resume_from is not None:
        step = checkpoint_step(run.resume_from)
        if _env_rank_zero():
            _carry_metrics(loggers, run.out_dir / "metrics.csv", step)
        run.last_logged = step
        if not quiet:
            print(f"resuming at step {step} of {cfg.max_steps}")
    else:
        (run.out_dir / "metrics.csv").unlink(missing_ok=True)
        if val_loader is not None:  # the loss before any training, for the curve and the summary
            run.results["val_loss_start"] = evaluate(run.model, val_loader, cfg)
            if _env_rank_zero():
                log_metrics(trainer, {"val_loss": run.results["val_loss_start"]}, 0)
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


def main(cfg: TrainConfig, stop_after: int | None = None, quiet: bool = False) -> dict[str, Any]:
    """Train according to `cfg`; returns {"losses": {step: loss}, "val_loss", "final", "seconds", ...}."""
    run = setup(cfg, quiet=quiet)
    run.out_dir.mkdir(parents=True, exist_ok=True)
    (run.out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    t0 = time.perf_counter()
    callback = None
    try:
        callback = fit(run, stop_after=stop_after, quiet=quiet)
    except NonFiniteLoss as e:
        step = run.trainer.global_step
        where = run.save_weights(f"step-{step}") if step > 0 else None
        kept = f"the last good weights (step {step}) are in {where}" if where else "nothing was trained yet"
        raise FinetuneError(f"training stopped: {e}; {kept}. Lower lr, set grad_clip, or use precision bf16-mixed "
                            f"instead of 16-mixed") from None
    seconds = time.perf_counter() - t0
    final = run.save_weights("final")
    run.results.update(losses=dict(callback.history), final=str(final), seconds=seconds, out_dir=str(run.out_dir))
    if run.is_zero and cfg.logger == "csv":
        png = plot_losses(run.out_dir / "metrics.csv", run.out_dir / "loss.png")
        run.results["plot"] = str(png) if png else None
    if run.is_zero and not quiet:
        h = run.results["losses"]
        steps = sorted(h)
        if steps:
            k = max(1, min(10, len(steps) // 5))
            first = sum(h[s] for s in steps[:k]) / k
            last = sum(h[s] for s in steps[-k:]) / k
            line = f"done: {len(steps)} steps in {seconds:.1f}s; train loss {first:.3f} -> {last:.3f} (mean of {k})"
        else:
            line = f"done in {seconds:.1f}s"
        if run.results.get("val_loss") is not None:
            start = run.results.get("val_loss_start")
            line += f"; val loss {'' if start is None else f'{start:.3f} -> '}{run.results['val_loss']:.3f}"
        print(line)
        print(f"saved: {final}" + (f", {run.results.get('plot')}" if run.results.get("plot") else ""))
    return run.results


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
    tmp = out_png.with_name(f".{out_png.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out_png)
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
    main(cfg)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune with LoRA (or in full) from a YAML recipe",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False)
    p.add_argument("-h", "--help", action="store_true", help="show the config keys")
    p.set_defaults(func=lambda args: run_cli((["--help"] if args.help else []) + list(args.overrides)),
                   accepts_overrides=True)
