"""Infinite-context training (chunks with the state carried) and state tuning."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from conftest import random_rwkv4_state_dict, write_checkpoint
from finetune import load_model
from finetune.adapters import add_lora
from finetune.infctx import StateTune, chunked_loss


def window_loss(model, ids, tgt, mask):
    logits = model(ids)
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none")
    return (ce * mask.reshape(-1)).sum() / mask.sum()


def test_chunks_equal_one_window(tmp_path):
    """A 2048-token sequence as 4 chunks of 512 gives the loss and the gradients of one 2048 window."""
    path = write_checkpoint(tmp_path / "m.pth", random_rwkv4_state_dict(2, 32, 61, seed=3))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 61, (1, 2049), generator=g)
    mask = (torch.rand(1, 2048, generator=g) > 0.3).float()
    results = []
    for chunked in (False, True):
        torch.manual_seed(0)
        model = add_lora(load_model(path).train(), r=4, alpha=8, parts=("att", "ffn"), train=("time",))
        for n, p in model.named_parameters():  # non-zero B so LoRA A gets gradients too
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)
        if chunked:
            loss = chunked_loss(model, ids[:, :-1], ids[:, 1:], mask, chunk_len=512)
        else:
            loss = window_loss(model, ids[:, :-1], ids[:, 1:], mask)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-6)
    assert g1.keys() == g2.keys() and any("time_decay" in n for n in g1)
    for n in g1:
        scale = g1[n].abs().max().clamp(min=1e-6)
        assert ((g2[n] - g1[n]).abs().max() / scale) < 1e-4, n


MEMORY_WORKER = r"""
import json, resource, sys, torch
sys.path.insert(0, {root!r})
from finetune.models.rwkv4 import RWKV, RWKVConfig
from finetune.infctx import chunked_loss
import torch.nn.functional as F
ctx, mode = int(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
model = RWKV(RWKVConfig(2, 192, 128)).train()
ids = torch.randint(0, 128, (1, ctx + 1))
mask = torch.ones(1, ctx)
def run(ids, mask):
    if mode == "infctx":
        loss = chunked_loss(model, ids[:, :-1], ids[:, 1:], mask, chunk_len=512)
    else:
        loss = F.cross_entropy(model(ids[:, :-1]).reshape(-1, 128), ids[:, 1:].reshape(-1))
    loss.backward()
run(ids[:, :65], mask[:, :64])  # warm up (kernel load, allocator)
# reset this process's peak RSS (VmHWM) to its current RSS: the warm-up's own transient peak (a first kernel build,
# a fresh machine's first ops) must not count
open("/proc/self/clear_refs", "w").write("5")
base = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
run(ids, mask)
peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
print(json.dumps({{"increase": max(peak - base, 0)}}))
"""


def peak_increase(tmp_path, ctx, mode):
    script = tmp_path / "mem.py"
    script.write_text(MEMORY_WORKER.format(root=str(Path(__file__).resolve().parent.parent)))
    # glibc keeps freed heap pages (RSS only grows); force big blocks through mmap so RSS follows live memory
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, str(script), str(ctx), mode], capture_output=True, text=True, check=True,
                         env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["increase"]


def test_infctx_memory_is_flat_in_ctx_len(tmp_path):
    small = peak_increase(tmp_path, 1024, "infctx")
    large = peak_increase(tmp_path, 8192, "infctx")
    plain = peak_increase(tmp_path, 8192, "plain")
    mib = 2 ** 20
    print(f"peak increase: infctx 1024 {small / mib:.0f} MiB, infctx 8192 {large / mib:.0f} MiB, "
          f"plain 8192 {plain / mib:.0f} MiB")
    assert large <= 1.5 * max(small, 16 * mib)
    assert plain > 3 * large  # the measurement can see activations at all


def test_state_tuning_lowers_the_loss(tmp_path):
    path = write_checkpoint(tmp_path / "m.pth", random_rwkv4_state_dict(2, 32, 40, seed=5))
    model = load_model(path).train()
    for p in model.parameters():
        p.requires_grad_(False)
    tune = StateTune(model)
    opt = torch.optim.Adam(tune.parameters(), lr=0.1)
    seq = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3] * 2])
    losses = []
    for _ in range(100):
        logits = model(seq[:, :-1], tune.batch(1))
        loss = F.cross_entropy(logits.reshape(-1, 40), seq[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses[::10]
    assert all(p.grad is None for p in model.parameters())  # only the state learned
    # the learned state plugs into generation through model.initial_state
    model.initial_state = tune().detach()
    with torch.no_grad():
        first, _ = model.step(seq[:, 0])
        torch.testing.assert_close(first, model(seq[:, :1], tune.batch(1))[:, 0])
