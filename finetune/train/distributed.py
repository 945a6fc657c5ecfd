"""Multi-device training through Lightning's own engines, and saving adapters from sharded (ZeRO-3) parameters.

    strategy: auto | ddp | deepspeed_stage_2 | deepspeed_stage_2_offload | deepspeed_stage_3 | deepspeed_stage_3_offload

`lightning_strategy(cfg)` turns the config into what `pl.Trainer(strategy=...)` gets: the name itself for auto/ddp,
a `DeepSpeedStrategy` with the stage and offload arguments of Lightning's registered names for DeepSpeed (after
checking, with one-line errors, that deepspeed is installed and CUDA is present: Lightning's DeepSpeed refuses CPUs).

Under ZeRO-3 every rank holds a flat 1/world slice of each parameter (`param.ds_tensor`; `param.data` is empty), so a
state dict taken as-is is empty. `gathered(params)` makes the full tensors visible for the duration of a `with` block
(deepspeed.zero.GatheredParameters on the parameters DeepSpeed partitioned, those with a `ds_id`); every rank must
enter it (it is a collective), and only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterable, Iterator

import torch

from finetune.errors import FinetuneError
from finetune.train.config import TrainConfig

# Lightning's registered DeepSpeed names -> DeepSpeedStrategy arguments (the same as its registry)
DEEPSPEED_ARGS: dict[str, dict[str, Any]] = {
    "deepspeed_stage_2": {"stage": 2},
    "deepspeed_stage_2_offload": {"stage": 2, "offload_optimizer": True},
    "deepspeed_stage_3": {"stage": 3},
    "deepspeed_stage_3_offload": {"stage": 3, "offload_optimizer": True, "offload_parameters": True},
}


def env_rank_zero() -> bool:
    """Rank 0 as the launcher's environment says (torchrun / Lightning set RANK or NODE_RANK + LOCAL_RANK); what a
    process knows before Lightning has started."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"]) == 0
    return int(os.environ.get("NODE_RANK", 0)) == 0 and int(os.environ.get("LOCAL_RANK", 0)) == 0


def strategy_spec(name: str) -> tuple[str, dict[str, Any]]:
    """("auto" | "ddp" | "deepspeed", constructor arguments)."""
    if name in DEEPSPEED_ARGS:
        return "deepspeed", dict(DEEPSPEED_ARGS[name])
    if name in ("auto", "ddp"):
        return name, {}
    raise FinetuneError(f"strategy: {name!r} is not one of auto, ddp, {', '.join(DEEPSPEED_ARGS)}")


def deepspeed_available() -> bool:
    try:
        import deepspeed  # noqa: F401
    except Exception:
        return False
    return True


def on_cuda(cfg: TrainConfig, cuda_available: bool | None = None) -> bool:
    """Whether the run trains on CUDA GPUs (accelerator auto picks them when there are any)."""
    cuda_available = torch.cuda.is_available() if cuda_available is None else cuda_available
    return cuda_available and cfg.accelerator != "cpu"


def lightning_strategy(cfg: TrainConfig, cuda_available: bool | None = None,
                       have_deepspeed: bool | None = None) -> Any:
    """What to pass as `pl.Trainer(strategy=...)` for cfg.strategy; one-line FinetuneError when it cannot run."""
    kind, kwargs = strategy_spec(cfg.strategy)
    if kind != "deepspeed":
        return kind
    have_deepspeed = deepspeed_available() if have_deepspeed is None else have_deepspeed
    if not have_deepspeed:
        raise FinetuneError(f"strategy: {cfg.strategy} needs DeepSpeed (pip install 'rwkv-lora[deepspeed]'); or use "
                            f"strategy: ddp")
    if not on_cuda(cfg, cuda_available):
        raise FinetuneError(f"strategy: {cfg.strategy} needs CUDA GPUs (Lightning's DeepSpeed does not run on the "
                            f"CPU); use strategy: ddp with accelerator: cpu")
    from pytorch_lightning.strategies import DeepSpeedStrategy

    return DeepSpeedStrategy(**kwargs)


@contextlib.contextmanager
def gathered(params: Iterable[torch.nn.Parameter]) -> Iterator[None]:
    """Full tensors inside the block: DeepSpeed's gather for ZeRO-3 parameters (`ds_id`), nothing for ordinary
    ones. Parameters are re-partitioned on exit."""
    sharded = [p for p in params if hasattr(p, "ds_id")]
    if not sharded:
        yield
        return
    import deepspeed  # only ever installed on CUDA machines; a ZeRO-3 parameter means it is there

    with deepspeed.zero.GatheredParameters(sharded, modifier_rank=None):
        yield
