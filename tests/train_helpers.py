"""Test-only machinery for the trainer: Lightning callbacks passed through `main(..., callbacks=[...])`, peft's own
adapter loader, and a stand-in for DeepSpeed's ZeRO-3 partitioning (DeepSpeed needs CUDA)."""

from __future__ import annotations

import contextlib
import math
import types
from pathlib import Path
from typing import Iterator, Sequence

import pytorch_lightning as pl
import torch


class KilledForTest(RuntimeError):
    pass


class StopAfter(pl.Callback):
    """Simulates a run killed right after optimizer step `step` (after the run's own end-of-step saving)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            raise KilledForTest(trainer.global_step)


def apply_adapter(model: torch.nn.Module, adapter_dir: str | Path) -> torch.nn.Module:
    """Our RWKV + an adapter directory through peft's own loader (unmerged), with the tensors trained in full put in
    place: what a peft user would do by hand."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from finetune.adapter_format import TRAINED_TENSORS

    adapter_dir = Path(adapter_dir)
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    full = adapter_dir / TRAINED_TENSORS
    if full.exists():
        params = dict(peft_model.get_base_model().named_parameters())
        with torch.no_grad():
            for k, v in load_file(str(full)).items():
                params[k].data = v.to(params[k].dtype)
    return peft_model.eval()


# ---- ZeRO-3 without DeepSpeed: each parameter flattened, padded to a multiple of world, rank r holding elements
# [r*n, (r+1)*n), and `data` emptied, as deepspeed.zero partitions it


def shard(t: torch.Tensor, world: int) -> list[torch.Tensor]:
    """A tensor as ZeRO-3 partitions it: `world` flat slices of equal length (the last one zero-padded)."""
    flat = t.detach().reshape(-1)
    per = math.ceil(flat.numel() / world)
    padded = torch.zeros(per * world, dtype=flat.dtype)
    padded[:flat.numel()] = flat
    return [padded[r * per:(r + 1) * per].clone() for r in range(world)]


def unshard(shards: Sequence[torch.Tensor], shape: Sequence[int]) -> torch.Tensor:
    """The full tensor from the per-rank flat slices of `shard` (the padding dropped)."""
    flat = torch.cat([s.reshape(-1) for s in shards])
    numel = math.prod(shape)
    assert flat.numel() >= numel
    return flat[:numel].reshape(tuple(shape)).clone()


def simulate_zero3(params: Sequence[torch.nn.Parameter], world: int) -> None:
    """Partition parameters like ZeRO-3: a `ds_id` (what marks a DeepSpeed parameter), the shards, empty data."""
    for i, p in enumerate(params):
        p.ds_id = i
        p.ds_shards = shard(p.data, world)
        p.ds_shape = tuple(p.shape)
        p.data = torch.empty(0, dtype=p.dtype)


@contextlib.contextmanager
def gathered_parameters(params: Sequence[torch.nn.Parameter], modifier_rank: int | None = None) -> Iterator[None]:
    """deepspeed.zero.GatheredParameters for the simulated layout: whole tensors inside, partitioned again after."""
    for p in params:
        p.data = unshard(p.ds_shards, p.ds_shape).to(p.dtype)
    try:
        yield
    finally:
        for p in params:
            p.data = torch.empty(0, dtype=p.dtype)


def fake_deepspeed() -> types.ModuleType:
    """A `deepspeed` module holding only `zero.GatheredParameters`, for sys.modules."""
    module = types.ModuleType("deepspeed")
    module.zero = types.SimpleNamespace(GatheredParameters=gathered_parameters)
    return module
