"""finetune/ops/head_ce.py: the head and the cross-entropy fused, a few rows at a time, against the plain
F.cross_entropy on whole logits in float64."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from finetune.ops import head_ce
from finetune.ops.head_ce import head_cross_entropy


def plain(hidden, weight, targets, mask):
    """The definition: whole logits, F.cross_entropy, weighted by the mask."""
    logits = hidden @ weight.t()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return (ce * mask.reshape(-1)).sum()


def case(B=2, T=37, C=24, V=1000, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(B, T, C, generator=g) * 2).to(dtype)
    weight = torch.randn(V, C, generator=g).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.3).float()
    return hidden, weight, targets, mask


def test_loss_and_gradients_equal_whole_logits_in_float64(monkeypatch):
    """Several chunks (11 rows each, the last one short): loss, gradient of the hidden states and of a head trained
    in full equal autograd through the whole logits to 1e-10."""
    monkeypatch.setattr(head_ce, "CHUNK_BYTES", 4 * 1000 * 11)
    assert head_ce.rows_per_chunk(1000) == 11
    hidden, weight, targets, mask = case()
    head = nn.Linear(24, 1000, bias=False).double()
    head.weight.data.copy_(weight)
    h1 = hidden.clone().requires_grad_()
    total, count = head_cross_entropy(h1, head, targets, mask)
    (total * 0.37).backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    expected = plain(h2, w2, targets, mask)
    (expected * 0.37).backward()
    assert count.item() == mask.sum().item()
    assert total.dtype == torch.float64
    torch.testing.assert_close(total, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(head.weight.grad, w2.grad, rtol=1e-10, atol=1e-12)


def test_frozen_head_fp32_matches_and_keeps_no_logits():
    """fp32, frozen head (LoRA training): equal to the plain path; what is kept for the backward pass is the [N, C]
    gradient, not [N, V] logits (counted with saved-tensor hooks)."""
    hidden, weight, targets, mask = case(T=300, V=5000, dtype=torch.float32)
    head = nn.Linear(24, 5000, bias=False)
    head.weight.data.copy_(weight)
    head.weight.requires_grad_(False)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    h1 = hidden.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        total, _ = head_cross_entropy(h1, head, targets, mask)
    total.backward()
    assert max(saved) <= hidden.numel() < 2 * 300 * 5000 / 100
    h2 = hidden.clone().requires_grad_()
    expected = plain(h2, weight, targets, mask)
    expected.backward()
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-4, atol=1e-5)
    assert head.weight.grad is None


def test_all_masked_is_zero_not_nan_and_no_grad_works():
    hidden, weight, targets, _ = case(dtype=torch.float32)
    head = nn.Linear(24, 1000, bias=False)
    head.weight.data.copy_(weight)
    h = hidden.clone().requires_grad_()
    total, count = head_cross_entropy(h, head, targets, torch.zeros(2, 37))
    (total / count.clamp(min=1)).backward()
    assert total.item() == 0.0 and count.item() == 0.0
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(head.weight.grad, torch.zeros_like(weight))
    with torch.no_grad():
        total, _ = head_cross_entropy(hidden, head, targets, torch.ones(2, 37))
    torch.testing.assert_close(total, plain(hidden, weight, targets, torch.ones(2, 37)), rtol=1e-5, atol=1e-4)


def test_a_head_that_is_not_plain_takes_the_plain_path():
    """A head with a bias (or wrapped by LoRA) is called as a module: same loss, gradients reach its parameters."""
    hidden, weight, targets, mask = case(dtype=torch.float32)
    head = nn.Linear(24, 1000, bias=True)
    assert not head_ce.fusable(head)
    total, _ = head_cross_entropy(hidden, head, targets, mask)
    total.backward()
    logits = head(hidden)
    ce = F.cross_entropy(logits.reshape(-1, 1000), targets.reshape(-1), reduction="none")
    torch.testing.assert_close(total, (ce * mask.reshape(-1)).sum(), rtol=1e-5, atol=1e-4)
    assert head.bias.grad is not None


def test_bf16_autocast_close_to_the_plain_path():
    """Under bf16 autocast (CPU) the head's product runs in bf16 as it does unfused: the two agree to bf16 rounding."""
    hidden, weight, targets, mask = case(dtype=torch.float32)
    head = nn.Linear(24, 1000, bias=False)
    head.weight.data.copy_(weight)
    head.weight.requires_grad_(False)
    h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, _ = head_cross_entropy(h1, head, targets, mask)
        logits = head(h2)
    unfused = F.cross_entropy(logits.float().reshape(-1, 1000), targets.reshape(-1), reduction="none")
    unfused = (unfused * mask.reshape(-1)).sum()
    fused.backward()
    unfused.backward()
    torch.testing.assert_close(fused, unfused, rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=2e-2, atol=2e-2)


def test_outputs_finite_checks_every_logit(monkeypatch):
    """One non-finite logit anywhere (a -inf at a row's non-target column included), in any chunk, is found."""
    monkeypatch.setattr(head_ce, "CHUNK_BYTES", 4 * 1000 * 11)
    hidden, weight, _, _ = case(dtype=torch.float32)
    head = nn.Linear(24, 1000, bias=False)
    head.weight.data.copy_(weight)
    assert head_ce.head_outputs_finite(hidden, head)
    for row, col, value in ((0, 0, float("nan")), (70, 999, -float("inf")), (73, 5, float("inf"))):
        bad = head.weight.detach().clone()
        bad[col] = 0.0
        bad[col, 0] = 1.0
        h = hidden.detach().clone().reshape(-1, 24)
        h[row, 0] = value
        head.weight.data.copy_(bad)
        assert not head_ce.head_outputs_finite(h.reshape(2, 37, 24), head), (row, col)


def test_bf16_head_held_narrow_is_widened_a_block_at_a_time(monkeypatch):
    """A quantized base's head held in bf16 under fp32 compute (no autocast): fused, the weight widened a few rows at
    a time (several blocks here), equal to the float64 definition on the same bf16 values; never the plain path."""
    from finetune.quant import QuantLinear

    monkeypatch.setattr(head_ce, "CHUNK_BYTES", 4 * 24 * 300)  # blocks of 300 vocabulary rows, 97 hidden rows
    hidden, weight, targets, mask = case(T=300, V=1000, dtype=torch.float32)
    head = QuantLinear(weight.bfloat16())
    buffer = head_ce.widen_buffer(head.weight, torch.float32)
    assert head_ce.fusable(head) and len(list(head_ce._widened(head.weight, buffer, []))) == 4
    monkeypatch.setattr(head, "forward", None)  # the fused path must not call the module
    h1 = hidden.clone().requires_grad_()
    total, _ = head_cross_entropy(h1, head, targets, mask)
    total.backward()
    h2 = hidden.double().requires_grad_()
    expected = plain(h2, head.weight.double(), targets, mask)
    expected.backward()
    assert total.dtype == torch.float32 and head.weight.dtype == torch.bfloat16
    torch.testing.assert_close(total.double(), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(h1.grad.double(), h2.grad, rtol=1e-4, atol=1e-5)


def test_head_left_in_a_checkpoint_file_is_read_from_it(monkeypatch, tmp_path):
    """A bf16 head left in a checkpoint's memory map (a quantized base's, `build_model(in_file=True)`): the fused
    loss reads it a block at a time and releases each block's pages, so after the forward and backward passes at
    most a block of it is resident, not the whole; the loss and gradient are those of the same head in memory."""
    from finetune.quant import QuantLinear
    from test_pages import resident

    monkeypatch.setattr(head_ce, "CHUNK_BYTES", 4 * 512 * 1024)  # blocks of 1024 vocabulary rows (of 8192)
    hidden, weight, targets, mask = case(T=64, C=512, V=8192, dtype=torch.float32)
    weight = weight.bfloat16()  # 8 MiB
    torch.save({"head.weight": weight}, tmp_path / "ckpt.pth")
    in_file = QuantLinear(torch.load(tmp_path / "ckpt.pth", mmap=True, weights_only=True)["head.weight"])
    results = []
    for head in (in_file, QuantLinear(weight.clone())):
        h = hidden.clone().requires_grad_()
        total, _ = head_cross_entropy(h, head, targets, mask)
        total.backward()
        results.append((total, h.grad))
    assert resident(in_file.weight) <= 1024 * 512 * 2 + (64 << 10)  # a block and the fault-around, not 8 MiB
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=0)


def test_chunks_are_bigger_on_a_gpu():
    """128 rows of the World vocabulary per chunk on the CPU (32 MB of fp32 logits, cache-sized); 1024 on a GPU,
    where each chunk's ~15 kernel launches, not memory, are what costs (no GPU needed: the size is the device's)."""
    assert head_ce.rows_per_chunk(65536) == head_ce.rows_per_chunk(65536, "cpu") == 128
    assert head_ce.rows_per_chunk(65536, torch.device("cuda")) == 1024
    assert head_ce.rows_per_chunk(10 ** 9, "cuda") == 1  # never zero rows
