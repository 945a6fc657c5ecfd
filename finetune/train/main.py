"""The training run, in the shape of litgpt's finetune scripts:

    setup(cfg)   check every input (config, out_dir, checkpoint, data, tokenizer, a resumable checkpoint) and build
                 the model and the data; every user mistake is a one-line FinetuneError here, before any training
    main(cfg)    lock out_dir, setup, fit, save the final weights, plot, report; SIGTERM / SIGINT end it with
                 RunStopped after a resumable save
    fit(run)     the loop: Lightning's Trainer over LitRWKV (module.py) with RunCallback (callbacks.py)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
import torch.nn as nn
from pytorch_lightning.utilities.exceptions import SIGTERMException

from finetune.adapters import add_lora, full_tensor_names, unwrap
from finetune.atomic import atomic_file, check_inputs_outside, remove_stale_temps
from finetune.checkpoint import fingerprint, read_state_dict
from finetune.data import Corpus, WindowDataset, open_corpus
from finetune.errors import FinetuneError, first_line
from finetune.infctx import StateTune, StateTuned
from finetune.models import detect
from finetune.quant import build_model
from finetune.tokenizer import load_tokenizer
from finetune.train.batches import StepBatchSampler
from finetune.train.callbacks import ProgressBar, RunCallback
from finetune.train.config import TrainConfig
from finetune.train.distributed import env_rank_zero, lightning_strategy, on_cuda
from finetune.train.loss import window_totals
from finetune.train.memory import trim_between_blocks
from finetune.train.layout import FINAL
from finetune.train.module import LitRWKV, run_record
from finetune.train.optim import optimizer_class
from finetune.train.report import METRICS_CSV, MetricsLog, plot_losses, summary_line
from finetune.train.run import (CONFIG_JSON, LAST_CKPT, DirectCheckpointIO, OutDirLock, Run, check_out_dir,
                                read_resumable)
from finetune.train.signals import RunStopped, StopSignals

# ----------------------------------------------------------------------------------------------------------------------
# setup


def base_precision_dtype(precision: str) -> torch.dtype:
    """The dtype the frozen base is held in for a precision setting (trained tensors are always fp32)."""
    return {"32": torch.float32, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}[precision]


def _data_record(corpus: Corpus, key: str) -> str | None:
    """What the corpus manifest records under `key` (tokenizer, template), or None."""
    meta = corpus.meta if isinstance(corpus.meta, dict) else None
    return meta.get(key) if meta else None


def check_data(path: str, key: str, cfg: TrainConfig, vocab_size: int, tokenizer_name: str | None) -> Corpus:
    """Open a corpus and check it against the model and the tokenizer; returns it."""
    if not path:
        raise FinetuneError(f"{key}: required (a binidx prefix or the PREFIX.json manifest from rwkv-lora prepare)")
    corpus = open_corpus(path)
    if corpus.num_tokens < cfg.ctx_len + 1:
        raise FinetuneError(f"{path}: {corpus.num_tokens} tokens, fewer than one window of ctx_len + 1 = "
                            f"{cfg.ctx_len + 1}; lower ctx_len or add data")
    data_tok = _data_record(corpus, "tokenizer")
    top = corpus.max_token_id()
    if top >= vocab_size:
        raise FinetuneError(f"{path}: token id {top} >= the model's vocab_size {vocab_size}; the data was made with "
                            f"another tokenizer ({data_tok or 'unknown'})")
    if tokenizer_name is not None and data_tok is not None and data_tok != tokenizer_name:
        raise FinetuneError(f"{path}: prepared with tokenizer {data_tok!r}, but tokenizer is {cfg.tokenizer!r} "
                            f"({tokenizer_name}); re-run rwkv-lora prepare or fix the tokenizer setting")
    return corpus


def _device_count(devices: Any) -> int:
    if isinstance(devices, int) and devices > 0:
        return devices
    if isinstance(devices, (list, tuple)):
        return max(len(devices), 1)
    return max(torch.cuda.device_count(), 1) if torch.cuda.is_available() else 1


def _build_model(cfg: TrainConfig, base: nn.Module) -> tuple[nn.Module, nn.Module, StateTune | None]:
    """(the model the trainer optimises, the RWKV inside it, the StateTune for train_type state)."""
    if cfg.train_type == "state":
        for p in base.parameters():
            p.requires_grad_(False)
        tune = StateTune(base)  # the state layout is the family's
        return StateTuned(base, tune), base, tune
    if cfg.method == "full":
        for p in base.parameters():
            p.requires_grad_(True)
        return base, base, None
    lo = cfg.lora
    model = add_lora(base, r=lo.r, alpha=lo.alpha, dropout=lo.dropout, parts=lo.parts, train=lo.train,
                     use_rslora=lo.use_rslora, init=lo.init)
    for p in model.parameters():  # trained tensors always in fp32 (AdamW on bf16 weights loses the updates)
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model, unwrap(model), None


LAUNCHER_VARS = ("NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "SLURM_NODEID", "TORCHELASTIC_RUN_ID")  # set per node


def setup(cfg: TrainConfig, quiet: bool = False) -> Run:
    """Check all inputs and build model and data. Raises FinetuneError (one line) before any training."""
    if not cfg.model:
        raise FinetuneError("model: required (path to a BlinkDL RWKV .pth or .safetensors checkpoint)")
    if not cfg.data:
        raise FinetuneError("data: required (a binidx prefix or the PREFIX.json manifest from rwkv-lora prepare)")
    out_dir = Path(cfg.out_dir)
    check_inputs_outside(out_dir, {"model": cfg.model, "data": cfg.data, "val_data": cfg.val_data,
                                   "tokenizer": cfg.tokenizer})
    if env_rank_zero():  # the other ranks start once rank 0 has begun writing there
        resume_from = check_out_dir(out_dir, cfg.resume)
    else:
        resume_from = out_dir / LAST_CKPT if cfg.resume else None
    if cfg.logger == "wandb":
        try:
            import wandb  # noqa: F401  (optional: only this logger needs it)
        except ImportError:
            raise FinetuneError("logger: wandb needs the wandb package (pip install 'rwkv-lora[wandb]'), or use "
                                "logger: csv") from None
    lightning_strategy(cfg)  # DeepSpeed without deepspeed or CUDA: one line now, not a traceback later
    optimizer_class(cfg)  # likewise adamw8bit without bitsandbytes
    if cfg.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise FinetuneError(f"accelerator: {cfg.accelerator}, but torch sees no CUDA GPU here (accelerator: auto "
                            f"uses one when there is one)")
    if not on_cuda(cfg) and (cfg.devices == -1 or isinstance(cfg.devices, list) or
                             (isinstance(cfg.devices, str) and "," in cfg.devices)):
        raise FinetuneError(f"devices: {cfg.devices!r} names GPUs, and this run is on the CPU; give a count of "
                            f"processes (devices: 1)")
    if cfg.num_nodes > 1 and not any(os.environ.get(k) for k in LAUNCHER_VARS):
        # without them every node believes it is node 0 and waits for the others for ever (signals included:
        # the wait is in C++, where Python's handlers do not run)
        raise FinetuneError(f"num_nodes: {cfg.num_nodes} needs a launcher on each node (torchrun, srun, ...; they "
                            f"set {', '.join(LAUNCHER_VARS[:3])}); started by hand, use num_nodes: 1")
    if cfg.precision == "16-mixed" and not on_cuda(cfg):  # torch's CPU autocast stops on fp16 in torch.cat
        raise FinetuneError("precision: 16-mixed is for GPUs without bf16 (V100, T4); on the CPU use 32 or bf16-mixed")
    if cfg.val_data is None and cfg.val_every:
        raise FinetuneError("val_every: set, but val_data is null")

    sd = read_state_dict(cfg.model)  # missing / unreadable checkpoint -> one-line error
    family = detect(sd, cfg.model)
    mcfg = family.config_from_state_dict(sd, cfg.model)
    tokenizer_name = None
    if cfg.tokenizer is not None:
        try:
            tokenizer_name = load_tokenizer(cfg.tokenizer).name
        except FinetuneError:
            raise
        except Exception as e:
            raise FinetuneError(f"tokenizer: cannot load {cfg.tokenizer!r} ({first_line(e)})") from None
    train_corpus = check_data(cfg.data, "data", cfg, mcfg.vocab_size, tokenizer_name)
    val_corpus = check_data(cfg.val_data, "val_data", cfg, mcfg.vocab_size, tokenizer_name) if cfg.val_data else None

    meta_tok = _data_record(train_corpus, "tokenizer")
    base_info = {"fingerprint": fingerprint(sd), **dataclasses.asdict(mcfg), "path": str(cfg.model)}
    if cfg.train_type == "state":
        meta = {"family": family.name, "base": base_info, "tokenizer": cfg.tokenizer or meta_tok, "kind": "state",
                "recipe": cfg.to_dict()}
    else:
        meta = {"family": family.name, "base": base_info, "base_quant": cfg.base_quant,
                "tokenizer": cfg.tokenizer or meta_tok, "r": cfg.lora.r,
                "alpha": cfg.lora.alpha, "dropout": cfg.lora.dropout, "parts": list(cfg.lora.parts),
                "train": list(cfg.lora.train), "recipe": cfg.to_dict()}
        if cfg.method == "full":
            meta["kind"] = "full"
    meta["template"] = _data_record(train_corpus, "template")
    if cfg.tokenizer is None and meta_tok is None and not quiet:
        print("note: the data has no manifest and no tokenizer is set; the adapter will not record its tokenizer",
              file=sys.stderr)

    torch.manual_seed(cfg.seed)
    # cast (and for base_quant int8/nf4, quantize) tensor by tensor while building: peak ~ the model as held; with a
    # base_quant base, the frozen emb and head stay in the checkpoint file's memory map, read from it when used
    trained = (full_tensor_names(sd, cfg.lora.train, family)
               if cfg.method == "lora" and cfg.train_type != "state" else [])
    base = build_model(sd, cfg.model, dtype=torch.float32 if cfg.method == "full" else
                       base_precision_dtype(cfg.precision), quant=cfg.base_quant, trained=trained,
                       in_file=cfg.base_quant != "none")
    del sd
    base.gradient_checkpointing = cfg.grad_checkpoint
    # the fixed mmap threshold trades speed for memory: only where the base is held narrow to fit in memory
    if cfg.trim_memory and not trim_between_blocks(base, cfg.base_quant != "none") and not quiet:
        print("note: trim_memory: this C library has no malloc_trim / mallopt (not glibc); ignored", file=sys.stderr)
    model, base, tune = _build_model(cfg, base)
    model.train()
    if cfg.compile:
        for block in base.blocks:  # in place: peft's wrappers and Lightning see the same modules
            block.compile()
        if not quiet:
            print("note: compile: the blocks are compiled during the first step (about a minute on a CPU)",
                  file=sys.stderr)
    resume_step = 0
    if resume_from is not None:  # the checkpoint must fit this model: checked now, with a one-line error
        expected = {f"model.{n}": tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
        resume_step = read_resumable(resume_from, expected, cfg, run_record(base_info["fingerprint"], cfg))
    # the run's windows: micro_bsz * grad_accum * devices per step (devices: upper bound before Lightning says)
    n_windows = cfg.max_steps * cfg.grad_accum * cfg.micro_bsz * _device_count(cfg.devices) * cfg.num_nodes
    train_ds = WindowDataset(train_corpus, cfg.ctx_len, schedule=cfg.sampling, seed=cfg.seed, epoch_steps=n_windows)
    val_ds = (WindowDataset(val_corpus, cfg.ctx_len, schedule="random", seed=cfg.seed + 1,
                            epoch_steps=cfg.val_samples) if val_corpus is not None else None)
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
# main


def main(cfg: TrainConfig, quiet: bool = False, callbacks: Sequence[pl.Callback] = ()) -> dict[str, Any]:
    """Train according to `cfg`; returns {"losses": {step: loss}, "val_loss", "final", "seconds", ...}.

    Raises FinetuneError (one line) for anything the user can fix, and RunStopped after SIGTERM / SIGINT (the
    outputs are then consistent and last.ckpt resumes the run). `callbacks`: more Lightning callbacks, run after
    the run's own."""
    with contextlib.ExitStack() as stack:
        if env_rank_zero():  # the other ranks run inside rank 0's lock
            stack.enter_context(OutDirLock(Path(cfg.out_dir)))
            remove_stale_temps(cfg.out_dir)  # a killed run's temporaries: with the lock held none is being written
        run = setup(cfg, quiet=quiet)
        if run.is_zero:
            write_config(cfg, run.out_dir)
        run.signals = stack.enter_context(StopSignals())
        t0 = time.perf_counter()
        try:
            callback = fit(run, quiet=quiet, callbacks=callbacks)
        except SIGTERMException:
            # Lightning's own SIGTERM stop (a SystemExit with status 0): only possible before on_train_start takes
            # the signal back, so no step ran since the start or the restored checkpoint
            last = run.out_dir / LAST_CKPT
            step = run.trainer.global_step if run.trainer is not None else run.resume_step
            raise RunStopped(signal.SIGTERM, step, last if last.exists() else None) from None
        seconds = time.perf_counter() - t0
        _stop_if_signalled(run)  # last.ckpt is at the final step: resuming writes final/
        final = run.save_weights(FINAL)
        run.results.update(losses=dict(callback.history), final=str(final), seconds=seconds,
                           out_dir=str(run.out_dir), steps=run.trainer.global_step - max(run.resume_step, 0))
        if run.is_zero and cfg.logger == "csv":
            png = plot_losses(run.out_dir / METRICS_CSV, run.out_dir / "loss.png")
            run.results["plot"] = str(png) if png else None
        _stop_if_signalled(run)
    if run.is_zero and not quiet:
        print(summary_line(run.results))
        print(f"saved: {final}" + (f", {run.results.get('plot')}" if run.results.get("plot") else ""))
    return run.results


def write_config(cfg: TrainConfig, out_dir: Path) -> None:
    with atomic_file(out_dir / CONFIG_JSON) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(cfg.to_dict(), indent=2) + "\n")


def _stop_if_signalled(run: Run) -> None:
    """A signal that came after the last step's check: the outputs are consistent, but the caller asked to stop."""
    if run.signals is not None and run.signals.received is not None:
        step = run.trainer.global_step if run.trainer is not None else run.resume_step
        raise RunStopped(run.signals.received, step, run.out_dir / LAST_CKPT)


# ----------------------------------------------------------------------------------------------------------------------
# fit


def quiet_lightning() -> None:
    """Lightning's start-up chatter and warnings that do not apply to this trainer's set-up."""
    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*Experiment logs directory.*")
    warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*`validation_step` but have no `val_dataloader`.*")


def loggers(cfg: TrainConfig, out_dir: Path) -> list[Any]:
    """Lightning loggers besides metrics.csv (which MetricsLog writes itself, failure-safe)."""
    if cfg.logger == "wandb":
        from pytorch_lightning.loggers import WandbLogger  # imports wandb, an optional package

        return [WandbLogger(project=cfg.wandb_project, save_dir=str(out_dir), config=cfg.to_dict())]
    return []


def fit(run: Run, quiet: bool = False, callbacks: Sequence[pl.Callback] = ()) -> RunCallback:
    """Build the Trainer and run the loop. Returns the RunCallback (its `history` holds step -> train loss)."""
    cfg = run.cfg
    quiet_lightning()
    # deterministic="warn" below (reproducible runs and resumes) wants cuBLAS's fixed workspace on a GPU, read when
    # cuBLAS starts; without it torch raises a Python warning at every matrix product (~1000 per step of a 0.1B
    # RWKV-7), each costing host time the GPU waits for
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    lit = LitRWKV(run.model, cfg, run_record(run.meta["base"]["fingerprint"], cfg))
    callback = RunCallback(run)
    val_interval = (cfg.val_every if cfg.val_every else cfg.max_steps) * cfg.grad_accum
    trainer = pl.Trainer(
        accelerator=cfg.accelerator, devices=cfg.devices, strategy=lightning_strategy(cfg), num_nodes=cfg.num_nodes,
        precision=cfg.precision if cfg.precision != "32" else "32-true",
        max_steps=cfg.max_steps, max_epochs=-1, accumulate_grad_batches=cfg.grad_accum,
        gradient_clip_val=cfg.grad_clip, gradient_clip_algorithm="norm",
        logger=loggers(cfg, run.out_dir) or False,
        callbacks=[callback, *callbacks] + ([] if quiet else [ProgressBar()]),
        enable_progress_bar=not quiet, enable_checkpointing=False,
        log_every_n_steps=cfg.log_every, val_check_interval=val_interval if run.val_data is not None else None,
        check_val_every_n_epoch=None, num_sanity_val_steps=0, limit_val_batches=None if run.val_data else 0,
        use_distributed_sampler=False, deterministic="warn", default_root_dir=str(run.out_dir),
        enable_model_summary=False,
        plugins=[] if cfg.deepspeed else [DirectCheckpointIO()],
    )
    run.trainer, run.lit = trainer, lit
    num_batches = cfg.max_steps * cfg.grad_accum
    sampler = StepBatchSampler(num_batches, cfg.micro_bsz, start=lambda: trainer.global_step * cfg.grad_accum,
                               rank=lambda: trainer.global_rank, world=lambda: trainer.world_size)
    if num_batches * cfg.micro_bsz * trainer.world_size > len(run.train_data):
        run.train_data.epoch_steps = num_batches * cfg.micro_bsz * trainer.world_size
    # each loader draws its iterators' seeds from a generator of its own, never from torch's global one: a resumed
    # run creates its iterator after restoring the global generator (LitRWKV.on_load_checkpoint), and a draw there
    # would shift every dropout mask after it away from the unbroken run's
    train_loader = torch.utils.data.DataLoader(run.train_data, batch_sampler=sampler, num_workers=cfg.num_workers,
                                               generator=torch.Generator().manual_seed(cfg.seed))
    val_loader = None
    if run.val_data is not None:
        val_loader = torch.utils.data.DataLoader(run.val_data, batch_size=cfg.micro_bsz, shuffle=False,
                                                 generator=torch.Generator().manual_seed(cfg.seed))
    if env_rank_zero():
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
    trainer.fit(lit, train_dataloaders=train_loader, val_dataloaders=val_loader,
                ckpt_path=str(run.resume_from) if run.resume_from else None, weights_only=True)
    run.results["val_loss"] = lit.last_val_loss
    if (val_loader is not None and cfg.val_every and cfg.max_steps % cfg.val_every
            and trainer.global_step == cfg.max_steps):
        # Lightning validates at multiples of val_every only: the final weights get their own figure, so that the
        # summary's last val loss is theirs
        run.results["val_loss"] = evaluate(run.model, val_loader, cfg)
        run.log_metrics({"val_loss": run.results["val_loss"]}, cfg.max_steps)
    return callback


@torch.no_grad()
def evaluate(model: nn.Module, loader: torch.utils.data.DataLoader, cfg: TrainConfig) -> float:
    """The mean masked loss over `loader`, in eval mode, in the precision training uses."""
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
