"""finetune/train/memory.py (`trim_memory`): freed memory handed back between blocks changes no number, and the
trim runs before every block, in the forward pass and in the recomputation of the backward pass."""

from __future__ import annotations

import pytest
import torch

from finetune.train import memory
from finetune.train.main import main
from test_lora import config, setup_dir  # noqa: F401


def test_trim_memory_keeps_every_loss_and_trims_before_each_block(setup_dir, monkeypatch):
    tmp, ckpt, data, _ = setup_dir
    assert memory._MALLOC_TRIM is not None  # glibc (Debian, the CI machine)
    calls = []
    real = memory._MALLOC_TRIM
    monkeypatch.setattr(memory, "_MALLOC_TRIM", lambda pad: calls.append(pad) or real(pad))
    plain = main(config(tmp, ckpt, data, max_steps=3, grad_checkpoint=True, trim_memory=False,
                        out_dir=str(tmp / "plain")), quiet=True)
    assert calls == []
    trimmed = main(config(tmp, ckpt, data, max_steps=3, grad_checkpoint=True, out_dir=str(tmp / "trimmed")),
                   quiet=True)  # trim_memory: true is the default
    assert trimmed["losses"] == plain["losses"] and len(plain["losses"]) == 3
    # 2 blocks x (forward + recomputation) x 3 steps (micro_bsz 4 in one window batch), at least
    assert len(calls) >= 2 * 2 * 3 and set(calls) == {0}



def test_gradients_are_freed_right_after_each_optimizer_step(setup_dir, monkeypatch):
    """No gradient is alive while the next step's forward pass runs (Lightning would zero them only after it), and
    accumulation still adds up within a step: with grad_accum 2, each step's first micro-batch starts with no
    gradient and its second with the first one's."""
    from finetune.train.module import LitRWKV

    tmp, ckpt, data, _ = setup_dir
    seen = []
    real = LitRWKV.training_step

    def recording(self, batch, batch_idx):
        seen.append(sum(p.grad is not None for p in self.trainable()))
        return real(self, batch, batch_idx)

    monkeypatch.setattr(LitRWKV, "training_step", recording)
    main(config(tmp, ckpt, data, max_steps=3, grad_accum=2, micro_bsz=2), quiet=True)
    n = len([p for p in seen if p])
    assert len(seen) == 6 and seen[0::2] == [0, 0, 0] and n == 3 and len(set(seen[1::2])) == 1, seen


PATTERN = """
import sys, torch
from finetune.models.rwkv4 import RWKV, RWKVConfig
import pytest
import torch

from finetune.train import memory

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096

x = torch.ones(1 << 21); del x  # an 8 MB tensor freed: glibc's default then raises its mmap threshold past 2 MB
if sys.argv[1] == "trim":
    assert memory.trim_between_blocks(RWKV(RWKVConfig(n_layer=1, n_embd=8, vocab_size=16)), map_big_allocations=True)
before = rss(); big, small = [], []
for i in range(60):
    big.append(torch.ones(512 * 1024))  # 2 MB, touched: a block's activations
    small.append(torch.ones(4096))  # 16 KB, kept alive between them
grown = rss() - before
del big
print(grown, rss() - before)
"""


def test_big_tensors_freed_between_small_live_ones_go_back_to_the_os():
    """After trim_between_blocks(map_big_allocations=True) (glibc's mmap threshold fixed at 1 MB), 2 MB tensors freed while small
    tensors allocated between them stay alive leave nothing resident; without it (glibc's default, which raises
    the threshold after a big free) they stay in the heap. Each case in a fresh process (the setting is global)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    left = {}
    for case in ("trim", "plain"):
        out = subprocess.run([sys.executable, "-c", PATTERN, case], capture_output=True, text=True, cwd=root,
                             check=True)
        grown, left[case] = map(int, out.stdout.split())
        assert grown > 100e6, (case, grown)
    assert left["trim"] < 20e6 and left["plain"] > 100e6, left


@pytest.mark.parametrize("family", ["rwkv4", "rwkv5", "rwkv6", "rwkv7"])
def test_what_a_block_returns_owns_its_memory(family):
    """Every tensor a block returns (the next block's input, v_first, the three state pieces) is its own storage,
    not a view of a bigger one: a view of a [B, T, C] activation (the token shift is its last row) would keep the
    whole window alive as long as the state, which with gradient checkpointing is until the backward pass (two
    [B, T, C] per block, 0.38 GB of a 1.5B RWKV-7's peak at ctx 1024). In training mode, with gradients."""
    from conftest import random_rwkv4_state_dict
    from rwkv56_checkpoints import random_rwkv5_state_dict, random_rwkv6_state_dict
    from rwkv7_helpers import random_rwkv7_state_dict

    from finetune.checkpoint import build_from_state_dict

    sd = {"rwkv4": lambda: random_rwkv4_state_dict(2, 32, 50),
          "rwkv5": lambda: random_rwkv5_state_dict(2, 32, 50, head_size=16),
          "rwkv6": lambda: random_rwkv6_state_dict(2, 32, 50, head_size=16),
          "rwkv7": lambda: random_rwkv7_state_dict(2, 32, 50, head_size=16)}[family]()
    model = build_from_state_dict(sd).train()
    returned = []
    for block in model.blocks:
        block.register_forward_hook(lambda m, args, out: returned.extend(t for t in out if torch.is_tensor(t)))
    model(torch.randint(0, 50, (2, 16)))
    assert len(returned) >= 2 * 4
    for t in returned:
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), tuple(t.shape)
