"""finetune/train/memory.py (`trim_memory`): freed memory handed back between blocks changes no number, and the
trim runs before every block, in the forward pass and in the recomputation of the backward pass."""

from __future__ import annotations

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
