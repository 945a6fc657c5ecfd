"""Which windows each optimizer step trains on.

Window j of the run is `finetune.data.WindowDataset` item j (deterministic given the seed), and optimizer step s
uses windows s*B .. (s+1)*B-1 (B = micro_bsz * grad_accum * devices). The sampler starts at the window of the
current step, so a resumed run continues exactly where its checkpoint was taken.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

IntOrGetter = int | Callable[[], int]


def _value(v: IntOrGetter) -> int:
    return v() if callable(v) else v


class StepBatchSampler(torch.utils.data.Sampler):
    """Micro-batch b on rank r holds windows (b * world + r) * micro_bsz + i; iteration starts at the micro-batch of
    the current optimizer step (`start()`).

    rank and world may be callables, read when iteration starts: under Lightning's launcher they are known only once
    the processes exist."""

    def __init__(self, num_batches: int, micro_bsz: int, start: Callable[[], int], rank: IntOrGetter = 0,
                 world: IntOrGetter = 1) -> None:
        self.num_batches, self.micro_bsz, self.start = num_batches, micro_bsz, start
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        rank, world = _value(self.rank), _value(self.world)
        for b in range(self.start(), self.num_batches):
            first = (b * world + rank) * self.micro_bsz
            yield list(range(first, first + self.micro_bsz))
