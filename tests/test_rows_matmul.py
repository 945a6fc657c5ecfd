"""The few-rows product of the serving engine (finetune/ops/rows_matmul.py, kernels/rows_matmul_cpu.cpp) against a
float64 reference computed here: every row count it serves, shapes that are not multiples of the panel or block
sizes, and a row's bits independent of the rows and threads it comes with."""

import pytest
import torch

from finetune.ops import rows_matmul

pytestmark = pytest.mark.skipif(rows_matmul.kernel() is None, reason="no C++ compiler for the CPU kernels")


@pytest.mark.parametrize("out_features, in_features", [(1, 1), (23, 5), (24, 256), (50, 257), (97, 600), (1000, 96)])
def test_matmul_equals_float64_product(out_features, in_features):
    """x W^T for 1..40 rows (chunks of 16, groups of 4, remainders), N off the 24-column panels, K off the
    256-deep blocks: within fp32 rounding of the float64 product; the padding of the last panel never shows."""
    g = torch.Generator().manual_seed(out_features * 1000 + in_features)
    w = torch.randn(out_features, in_features, generator=g)
    panels = rows_matmul.pack(w)
    P = -(-out_features // rows_matmul.PANEL)
    assert panels.shape == (P, in_features, rows_matmul.PANEL)
    x = torch.randn(40, in_features, generator=g)
    want = x.double() @ w.double().T
    bound = 1e-6 * (x.double().abs() @ w.double().abs().T) + 1e-7  # sum |x||w| * a few ulps of fp32
    for rows in (1, 2, 3, 4, 5, 8, 15, 16, 17, 33, 40):
        got = rows_matmul.matmul(x[:rows], panels, out_features)
        assert got.shape == (rows, out_features) and got.dtype == torch.float32
        assert ((got.double() - want[:rows]).abs() <= bound[:rows]).all(), rows


def test_a_row_gets_the_same_bits_whatever_comes_with_it():
    """Row i of a batch equals row i multiplied alone, bit for bit, at every batch size and position, at 1 and 2
    threads, and for a [B, T, in] input: a stream's logits do not depend on the streams decoded with it."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(130, 300, generator=g)
    panels = rows_matmul.pack(w)
    x = torch.randn(20, 300, generator=g)
    alone = torch.cat([rows_matmul.matmul(x[i:i + 1], panels, 130) for i in range(20)])
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for rows in range(1, 21):
                assert torch.equal(rows_matmul.matmul(x[:rows], panels, 130), alone[:rows]), (n, rows)
            assert torch.equal(rows_matmul.matmul(x[5:17], panels, 130), alone[5:17])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(rows_matmul.matmul(x.view(4, 5, 300), panels, 130), alone.view(4, 5, 130))
    t = x.t().contiguous().t()  # a non-contiguous view of the same values
    assert torch.equal(rows_matmul.matmul(t, panels, 130), alone)


def test_pack_refuses_what_the_kernel_does_not_take():
    """Only plain 2-D fp32 CPU weights are packed; 16-bit, float64 and 1-D tensors keep their own path."""
    w = torch.randn(30, 20)
    assert rows_matmul.pack(w.to(torch.bfloat16)) is None
    assert rows_matmul.pack(w.double()) is None
    assert rows_matmul.pack(w[0]) is None
    with pytest.raises(RuntimeError, match="panels do not match"):
        rows_matmul.matmul(torch.randn(2, 21), rows_matmul.pack(w), 30)


@pytest.mark.parametrize("groups, positions", [(1, 1), (5, 1), (3, 4), (8, 2)])
def test_lora_add_equals_float64_delta(groups, positions):
    """y += ((x A^T) * mask) B^T in place, mask rows shared by the positions of a sequence, or no mask: within fp32
    rounding of the float64 formula; rows whose mask is zero keep y's bits."""
    g = torch.Generator().manual_seed(groups * 10 + positions)
    n_in, n_out, rank = 70, 50, 40
    A, B = torch.randn(rank, n_in, generator=g), torch.randn(n_out, rank, generator=g)
    x = torch.randn(groups, positions, n_in, generator=g)
    y0 = torch.randn(groups, positions, n_out, generator=g)
    mask = (torch.rand(groups, rank, generator=g) < 0.5).float()
    mask[0] = 0  # the first sequence has no adapter here
    for m in (mask, None):
        y = y0.clone()
        out = rows_matmul.lora_add_(y, x, rows_matmul.pack(A), rank, rows_matmul.pack(B), m)
        assert out is y
        h = x.double() @ A.double().T
        if m is not None:
            h = h * m.double()[:, None, :]
        want = y0.double() + h @ B.double().T
        bound = 1e-6 * (y0.double().abs() + (x.double().abs() @ A.double().abs().T) @ B.double().abs().T) + 1e-7
        assert ((y.double() - want).abs() <= bound).all()
        if m is not None:
            assert torch.equal(y[0], y0[0])
