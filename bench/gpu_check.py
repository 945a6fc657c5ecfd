"""One-shot GPU check of the CUDA WKV kernels: build, correctness against a float64 reference, kernel throughput
against the memory-bandwidth floor (RWKV-4), timings (WKV-5/6), and a LoRA training step of a 169M- and a 1.5B-shaped
RWKV-4 in bf16; then the same for the RWKV-7 WKV kernel (build, float64 comparison at several T including T not a
multiple of 16, timing, and on a GPU the same kernel built with 2, 4 and 8 threads per row of the state, each checked
and timed).

    python bench/gpu_check.py                 # on a CUDA machine (a few minutes; prints Markdown tables)
    python bench/gpu_check.py --wkv7-only     # only the WKV-7 sections (a minute or two)
    python bench/gpu_check.py --device cpu    # the same checks on tiny sizes on the CPU (checks the script itself)

Needs no network and no `pip install -e .` (the repo root is put on sys.path). Exit status 1 when a correctness
check fails or the kernel does not build; the training-step part is guarded so that its failure still prints the
kernel tables.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from finetune.ops import build as kernel_build  # noqa: E402
from finetune.ops import wkv4 as wkv_mod  # noqa: E402
from finetune.ops import wkv7 as wkv7_mod  # noqa: E402
from finetune.ops.wkv4 import empty_wkv_state, wkv, wkv_reference  # noqa: E402
from finetune.ops.wkv6 import kernel_for as wkv6_kernel_for  # noqa: E402
from finetune.ops.wkv6 import wkv6, wkv6_reference  # noqa: E402

POISON_ENV = "RWKV_LORA_WKV_POISON"  # the CUDA binding pre-fills its outputs with NaN when set
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
NAMES = ["y", "state_out", "g_time_decay", "g_time_first", "g_k", "g_v", "g_state_in"]


def log(*a):
    print(*a, flush=True)


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------------------------
# Build


def build(device) -> tuple[object | None, float, str]:
    """The compiled extension for `device` (None when it fails), build/load seconds, and a note."""
    t0 = time.perf_counter()
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ext = wkv_mod.kernel_for(device)
    note = "; ".join(str(w.message) for w in caught)
    return ext, time.perf_counter() - t0, note


# ----------------------------------------------------------------------------------------------------------------------
# Correctness


def make_inputs(B, T, C, dtype, with_state, device, seed):
    g = torch.Generator().manual_seed(seed)
    time_decay = torch.randn(C, generator=g) * 1.5 - 0.5  # decays from ~0.01 to ~50 per step
    time_first = torch.randn(C, generator=g)
    k = (torch.randn(B, T, C, generator=g) * 2).to(dtype)  # bf16 inputs: rounded once, both sides see the same
    v = torch.randn(B, T, C, generator=g).to(dtype)
    if with_state:
        _, state = wkv_reference(time_decay, time_first, torch.randn(B, 17, C, generator=g) * 2,
                                 torch.randn(B, 17, C, generator=g))
        state = state.float()
    else:
        state = empty_wkv_state(B, C)
    gy = torch.randn(B, T, C, generator=g)
    gstate = torch.randn(B, 3, C, generator=g)
    return [x.to(device) for x in (time_decay, time_first, k, v, state, gy, gstate)]


def consistent_gstate(gstate, state_out):
    """The kernel treats (a, b, p) as the single quantity (a e^p, b e^p), so the p row of an incoming state gradient
    must be the one of a loss depending on that only: dL/dp = dL/da * a + dL/db * b."""
    gstate = gstate.clone()
    gstate[:, 2] = gstate[:, 0] * state_out[:, 0] + gstate[:, 1] * state_out[:, 1]
    return gstate


def run_wkv(time_decay, time_first, k, v, state, gy, gstate, backend):
    leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in (time_decay, time_first, k, v, state)]
    y, s = wkv(*leaves, backend=backend) if backend != "ref64" else wkv_reference(*leaves)
    loss = (y.double() * gy.double()).sum() + (s.double() * gstate.double()).sum()
    grads = torch.autograd.grad(loss, leaves)
    return [y.detach(), s.detach(), *grads]


def reference64(time_decay, time_first, k, v, state, gy, gstate):
    """float64 reference on the CPU (fast enough for the small B*C used here, even at T = 16384)."""
    cpu = [x.detach().cpu() for x in (time_decay, time_first, k, v, state, gy, gstate)]
    td, tf, k, v, state, gy, gstate = cpu
    with torch.no_grad():  # the p row consistent with this reference's own float64 state_out
        gstate = consistent_gstate(gstate.double(), wkv_reference(td.double(), tf.double(), k.double(), v.double(),
                                                                  state.double())[1])
    return run_wkv(td.double(), tf.double(), k.double(), v.double(), state.double(), gy, gstate, "ref64")


def recurrence64(time_decay, time_first, k, v, state, gy, gstate, dtype="float64"):
    """float64 (or `dtype`) forward and backward by the stable recurrence in numpy, vectorised over (B, C): the float64 reference
    for long T, where autograd through the time loop is too slow. Its backward is the analytic one (scaled
    gradients); `main` checks it against autograd at a moderate T first, so it stays tied to the definition."""
    import numpy as np

    td, tf, k, v, state, gy, gstate = (x.detach().cpu().double().numpy().astype(dtype) for x in
                                       (time_decay, time_first, k, v, state, gy, gstate))
    B, T, C = k.shape
    w, u = -np.exp(td), tf
    a, b, p = state[:, 0].copy(), state[:, 1].copy(), state[:, 2].copy()
    y = np.empty((B, T, C), dtype)
    states = np.empty((T, 3, B, C), dtype)
    for t in range(T):
        kt, vt = k[:, t], v[:, t]
        states[t] = a, b, p
        q = np.maximum(p, u + kt)
        e1, e2 = np.exp(p - q), np.exp(u + kt - q)
        y[:, t] = (e1 * a + e2 * vt) / (e1 * b + e2)
        q = np.maximum(p + w, kt)
        e1, e2 = np.exp(p + w - q), np.exp(kt - q)
        a, b, p = e1 * a + e2 * vt, e1 * b + e2, q
    s_out = np.stack([a, b, p], axis=1)
    ga, gb = gstate[:, 0].copy(), gstate[:, 1].copy()
    gw, gu = np.zeros((B, C), dtype), np.zeros((B, C), dtype)
    gk, gv = np.empty((B, T, C), dtype), np.empty((B, T, C), dtype)
    for t in range(T - 1, -1, -1):
        kt, vt, g, yt = k[:, t], v[:, t], gy[:, t], y[:, t]
        a, b, p = states[t]
        pt = np.maximum(p + w, kt)
        e1, e2 = np.exp(p + w - pt), np.exp(kt - pt)
        gw += e1 * (a * ga + b * gb)
        gv_t, gk_t = e2 * ga, e2 * (vt * ga + gb)
        ga, gb = ga * e1, gb * e1
        q = np.maximum(p, u + kt)
        e1, e2 = np.exp(p - q), np.exp(u + kt - q)
        den = e1 * b + e2
        ga, gb = ga + g * e1 / den, gb - g * yt * e1 / den
        guk = g * (vt - yt) * e2 / den
        gv[:, t], gk[:, t] = gv_t + g * e2 / den, gk_t + guk
        gu += guk
    gs_in = np.stack([ga, gb, ga * state[:, 0] + gb * state[:, 1]], axis=1)
    return [torch.from_numpy(x) for x in (y, s_out, gw.sum(0) * w, gu.sum(0), gk, gv, gs_in)]


AUTOGRAD_T_MAX = 400  # above this, the float64 reference is `recurrence64` (autograd over the loop is slow)


def rel_err(got, want):
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if not torch.isfinite(got).all():
        return math.inf
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def correctness(device, backend, cases, autograd_t_max=AUTOGRAD_T_MAX) -> tuple[list[list], bool]:
    rows, ok_all = [], True
    os.environ[POISON_ENV] = "1"
    try:
        for B, T, C, dtype, with_state in cases:
            t0 = time.perf_counter()
            td, tf, k, v, state, gy, gstate = make_inputs(B, T, C, dtype, with_state, device, seed=T * 7 + B)
            # one forward to get state_out for the consistent p-gradient, then forward + backward
            with torch.no_grad():
                _, s_out = wkv(td, tf, k, v, state, backend=backend)
            gstate = consistent_gstate(gstate, s_out)
            got = run_wkv(td, tf, k, v, state, gy, gstate, backend)
            sync(device)
            ref_fn = reference64 if T <= autograd_t_max else recurrence64
            want = ref_fn(td, tf, k, v, state, gy, gstate)
            errs = [rel_err(a, b) for a, b in zip(got, want)]
            # what fp32 arithmetic gives at best: the same recurrence in float32 (long slow-decay windows accumulate
            # rounding in the state, ~T*eps, whatever the implementation)
            floor = max(rel_err(a, b) for a, b in zip(recurrence64(td, tf, k, v, state, gy, gstate, "float32"),
                                                        want))
            tol = max(TOL[dtype], 4 * floor)
            nan = any(not torch.isfinite(x).all() for x in got)
            worst = max(errs)
            ok = worst < tol and not nan
            ok_all &= ok
            rows.append([f"B={B} T={T} C={C}", str(dtype).replace("torch.", ""), "yes" if with_state else "empty",
                         "autograd" if ref_fn is reference64 else "recurrence",
                         *[f"{e:.1e}" for e in errs], f"{floor:.1e}", f"{tol:.1e}", "NaN!" if nan else "none",
                         "PASS" if ok else "FAIL", f"{time.perf_counter() - t0:.1f}"])
            log(f"  checked B={B} T={T} C={C} {dtype}: worst {worst:.1e} {'PASS' if ok else 'FAIL'}")
    finally:
        os.environ.pop(POISON_ENV, None)
    return rows, ok_all


# ----------------------------------------------------------------------------------------------------------------------
# Kernel throughput


def timeit(fn, device, reps):
    fn()
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3 / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def throughput(device, ext, shapes, bandwidth, reps) -> list[list]:
    rows = []
    for B, T, C in shapes:
        for dtype in (torch.bfloat16, torch.float32):
            td, tf, k, v, state, gy, gstate = make_inputs(B, T, C, dtype, False, device, seed=1)
            w = -torch.exp(td.float()).contiguous()
            u = tf.float().contiguous()
            n, e = B * T * C, k.element_size()
            if ext is not None:
                fwd = lambda: ext.forward(w, u, k, v, state)  # noqa: E731
                bwd = lambda: ext.backward(w, u, k, v, state, gy, gstate)  # noqa: E731
            else:  # CPU dry run without a compiled kernel: time the reference, just to exercise the code
                fwd = lambda: wkv_reference(td, tf, k, v, state)  # noqa: E731
                bwd = None
            # forward: k, v read, y written (fp32). backward: pass 1 reads k, v and writes the states (3 fp32 per
            # step); pass 2 reads k, v, the states, gy and writes gk, gv (the [B,C] parts and [B,3,C] are negligible)
            bytes_f = n * (2 * e + 4)
            bytes_b = n * (2 * e + 12) + n * (2 * e + 12 + 4 + 8)
            for name, fn, nbytes in (("forward", fwd, bytes_f), ("backward", bwd, bytes_b)):
                if fn is None:
                    continue
                sec = timeit(fn, device, reps)
                floor = nbytes / bandwidth
                rows.append([f"B={B} T={T} C={C}", str(dtype).replace("torch.", ""), name, f"{sec * 1e3:.3f}",
                             f"{nbytes / sec / 1e9:.0f}", f"{floor * 1e3:.3f}", f"{floor / sec * 100:.0f}%",
                             f"{n / sec / 1e6:.0f}"])
            del td, tf, k, v, state, gy, gstate
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# WKV-5/6 (finetune/ops/wkv6.py): build, float64 comparison over several T, timing

WKV6_NAMES = ["y", "state_out", "g_r", "g_w", "g_k", "g_v", "g_u", "g_state_in"]


def wkv6_inputs(B, T, H, N, dtype, with_state, seed):
    """float64 CPU leaves (r, w, k, v, u, state) and output gradients. r, k, v are rounded to `dtype` once, so the
    reference and the kernel see the same values; per-token log decays span w = -exp(-20) .. -exp(5), i.e. decays
    from 1 - 2e-9 (long memory) to e^-148 (none)."""
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g, dtype=torch.float64).to(dtype).double() for _ in range(3))
    w = -torch.exp(torch.rand(B, T, H, N, generator=g, dtype=torch.float64) * 25 - 20)
    u = torch.randn(H, N, generator=g, dtype=torch.float64) * 0.5
    state = torch.randn(B, H, N, N, generator=g, dtype=torch.float64) * float(with_state)
    gy = torch.randn(B, T, H, N, generator=g, dtype=torch.float64)
    gstate = torch.randn(B, H, N, N, generator=g, dtype=torch.float64)
    return [r, w, k, v, u, state], gy, gstate


def wkv6_outputs(fn, leaves, gy, gstate):
    """y, state_out and the gradients of sum(y*gy) + sum(state_out*gstate) for the six leaves."""
    xs = [x.detach().clone().requires_grad_() for x in leaves]
    y, s = fn(*xs)
    loss = (y.double() * gy.to(y.device, torch.float64)).sum() + (s.double() * gstate.to(s.device, torch.float64)).sum()
    return [y.detach(), s.detach(), *torch.autograd.grad(loss, xs)]


def wkv6_correctness(device, cases) -> tuple[list[list], bool]:
    rows, ok_all = [], True
    os.environ[POISON_ENV] = "1"  # the CUDA binding pre-fills outputs and scratch with NaN
    try:
        for B, T, H, N, dtype, with_state in cases:
            t0 = time.perf_counter()
            leaves, gy, gstate = wkv6_inputs(B, T, H, N, dtype, with_state, seed=T * 7 + B + N)
            want = wkv6_outputs(wkv6_reference, leaves, gy, gstate)
            dev = [x.to(device, dtype if i in (0, 2, 3) else torch.float32) for i, x in enumerate(leaves)]
            got = wkv6_outputs(lambda *a: wkv6(*a, backend="kernel"), dev, gy.to(device), gstate.to(device))
            sync(device)
            errs = [rel_err(a, b) for a, b in zip(got, want)]
            # gradients come back in their input's dtype: bf16 ones carry one bf16 rounding (2^-9 relative)
            tols = [4e-3 if g.dtype == torch.bfloat16 else 1e-5 for g in got]
            nan = any(not torch.isfinite(x).all() for x in got)
            ok = not nan and all(e < t for e, t in zip(errs, tols))
            ok_all &= ok
            rows.append([f"B={B} T={T} H={H} N={N}", str(dtype).replace("torch.", ""), "yes" if with_state else "zero",
                         *[f"{e:.1e}" for e in errs], "NaN!" if nan else "none", "PASS" if ok else "FAIL",
                         f"{time.perf_counter() - t0:.1f}"])
            log(f"  checked WKV-5/6 B={B} T={T} H={H} N={N} {dtype}: worst {max(errs):.1e} {'PASS' if ok else 'FAIL'}")
    finally:
        os.environ.pop(POISON_ENV, None)
    return rows, ok_all


def wkv6_timing(device, ext, shapes, reps) -> list[list]:
    rows = []
    for B, T, H, N in shapes:
        for dtype in (torch.bfloat16, torch.float32):
            g = torch.Generator().manual_seed(1)
            r, k, v = (torch.randn(B, T, H, N, generator=g).to(device, dtype) for _ in range(3))
            w = -torch.exp(torch.rand(B, T, H, N, generator=g) * 9 - 8).to(device)
            u = (torch.randn(H, N, generator=g) * 0.5).to(device)
            state = torch.zeros(B, H, N, N, device=device)
            gy = torch.randn(B, T, H, N, generator=g).to(device)
            gstate = torch.zeros(B, H, N, N, device=device)
            fwd = timeit(lambda: ext.forward(r, w, k, v, u, state), device, reps)
            bwd = timeit(lambda: ext.backward(r, w, k, v, u, state, gy, gstate), device, reps)
            rows.append([f"B={B} T={T} H={H} N={N}", str(dtype).replace("torch.", ""), f"{fwd * 1e3:.3f}",
                         f"{(fwd + bwd) * 1e3:.3f}", f"{B * T / fwd:,.0f}", f"{B * T / (fwd + bwd):,.0f}"])
            del r, k, v, w, gy
    return rows


def wkv6_section(device, big) -> tuple[list[str], bool]:
    """The WKV-5/6 part of the report (Markdown sections) and whether its correctness checks passed."""
    import warnings

    parts = []
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ext = wkv6_kernel_for(device)
    note = "; ".join(str(w.message) for w in caught)
    parts.append("## WKV-5/6 kernel build\n\n" + table(["", ""], [
        ["build / load (s)", f"{time.perf_counter() - t0:.1f}"], ["kernel", "compiled" if ext else f"NONE: {note}"]]))
    log(parts[-1])
    if ext is None:
        return parts, False
    # T = 1, T not a multiple of the checkpoint interval (K = ceil(sqrt(T))), long T; N = 48 takes the kernels' path
    # for head sizes other than 64 (rows in global memory rather than registers)
    if big:
        cases = [(2, 1, 2, 64, torch.float32, False), (2, 1, 2, 64, torch.bfloat16, True),
                 (2, 333, 3, 64, torch.float32, True), (2, 333, 3, 64, torch.bfloat16, False),
                 (1, 2048, 2, 64, torch.float32, True), (1, 2048, 2, 64, torch.bfloat16, True),
                 (2, 100, 3, 48, torch.float32, True)]
    else:
        cases = [(2, 1, 2, 64, torch.float32, False), (1, 17, 2, 64, torch.bfloat16, True),
                 (2, 9, 2, 5, torch.float32, True)]
    log("\nWKV-5/6 correctness (kernel vs the float64 reference, outputs poisoned with NaN) ...")
    rows, ok = wkv6_correctness(device, cases)
    parts.append("## WKV-5/6 correctness (relative error: max |diff| / max |ref|; tol 1e-5, 4e-3 for bf16 "
                 "gradients)\n\n" + table(["shape", "r/k/v dtype", "state in", *WKV6_NAMES, "NaN", "result", "s"],
                                            rows))
    log(parts[-1])
    log("\nWKV-5/6 kernel time ...")
    shapes = [(1, 1024, 12, 64), (8, 1024, 32, 64), (8, 4096, 32, 64)] if big else [(1, 16, 2, 64)]
    try:
        rows = wkv6_timing(device, ext, shapes, reps=10 if big else 2)
        parts.append("## WKV-5/6 kernel time\n\n" + table(
            ["shape", "dtype", "fwd ms", "fwd+bwd ms", "fwd tok/s", "fwd+bwd tok/s"], rows))
    except Exception:
        parts.append("## WKV-5/6 kernel time\n\nFAILED:\n```\n" + traceback.format_exc() + "```")
    log(parts[-1])
    return parts, ok


# ----------------------------------------------------------------------------------------------------------------------
# LoRA training step


def train_step_bench(device, shapes, steps, warmup) -> list[list]:
    from peft import LoraConfig, get_peft_model

    from finetune.models.rwkv4 import RWKV, RWKVConfig

    rows = []
    for label, n_layer, n_embd, vocab, B, T in shapes:
        try:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            model = RWKV(RWKVConfig(n_layer=n_layer, n_embd=n_embd, vocab_size=vocab))
            model = model.to(device=device, dtype=torch.bfloat16)
            model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16,
                                                     target_modules=["key", "value", "receptance", "output"]))
            n_params = sum(p.numel() for p in model.parameters())
            n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            g = torch.Generator().manual_seed(0)
            idx = torch.randint(0, vocab, (B, T + 1), generator=g).to(device)

            def step():
                logits = model(idx[:, :-1])
                loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                         idx[:, 1:].reshape(-1))
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss

            t0 = time.perf_counter()
            for _ in range(warmup):
                loss = step()
            sync(device)
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            for _ in range(steps):
                loss = step()
            sync(device)
            sec = (time.perf_counter() - t0) / steps
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
            rows.append([label, f"{n_layer}x{n_embd}", f"{n_params / 1e6:.0f}M / {n_train / 1e6:.2f}M",
                         f"{B}x{T}", f"{first:.1f}", f"{sec * 1e3:.0f}", f"{B * T / sec:,.0f}", f"{peak:.2f}",
                         f"{loss.item():.3f}"])
            log(f"  trained {label}: {B * T / sec:,.0f} tokens/s")
            del model, opt
        except Exception as e:  # one shape failing (OOM, model API) must not hide the others
            rows.append([label, f"{n_layer}x{n_embd}", "-", f"{B}x{T}", "-", "-", "-", "-",
                         f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"])
            log(f"  training step {label} failed:\n{traceback.format_exc()}")
    return rows



# ----------------------------------------------------------------------------------------------------------------------
# The trainer in fp32 and bf16-mixed


def write_random_corpus(prefix: Path, vocab: int, n_tokens: int, seed: int) -> None:
    import numpy as np

    from finetune.binidx import BinidxWriter, token_dtype

    rng = np.random.default_rng(seed)
    writer = BinidxWriter(str(prefix), token_dtype(vocab))
    writer.add_document(rng.integers(0, vocab, n_tokens).astype(token_dtype(vocab)))
    writer.close()


def bench_config(pth: Path, data: Path, out: Path, precision: str, B: int, T: int, steps: int, **extra):
    """The run both the trainer and the plain loop measure: LoRA r=8 (alpha 16) on att and ffn, AdamW at 1e-4."""
    from finetune.train.config import load_config

    return load_config(None, {"model": str(pth), "data": str(data), "out_dir": str(out), "precision": precision,
                              "max_steps": steps, "micro_bsz": B, "ctx_len": T, "lr": 1e-4, "warmup_steps": 0,
                              "lora.r": 8, "lora.alpha": 16, **extra})


def trainer_run(device, pth: Path, data: Path, out: Path, precision: str, B: int, T: int, steps: int,
                warmup: int, compile: bool = False) -> tuple[float, float, float]:
    """`rwkv-lora train` itself (Lightning, LoRA r=8 on att and ffn, AdamW) for `steps` steps: (median tokens/s of
    the steps after `warmup`, as the trainer's metrics.csv records them, peak GiB on the device, last loss)."""
    from finetune.train.main import main as train_main
    from finetune.train.report import read_series

    cfg = bench_config(pth, data, out, precision, B, T, steps, accelerator=device.type, compile=compile)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    train_main(cfg, quiet=True)
    series = read_series(out / "metrics.csv", ("tokens_per_s", "train_loss"))
    rates = sorted(v for k, v in series["tokens_per_s"].items() if k > warmup)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return rates[len(rates) // 2], peak, series["train_loss"][max(series["train_loss"])]


def kernel_share(device, work) -> float:
    """The share of `work()`'s wall time that the GPU spent running kernels (from torch's profiler)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        work()
        sync(device)
        wall = time.perf_counter() - t0
    # the kernels' own rows (an operator's row also carries its kernels' time: counting both would double it)
    kernels = sum(e.self_device_time_total for e in prof.key_averages() if e.device_type == DeviceType.CUDA)
    return kernels / 1e6 / wall  # microseconds -> s


def loop_run(device, pth: Path, data: Path, out: Path, precision: str, B: int, T: int, steps: int,
             warmup: int, compile: bool = False) -> tuple[float, str]:
    """The same model, loss and optimizer as `trainer_run` in a plain loop (no Lightning, no callbacks, no per-step
    checks): (median tokens/s after `warmup` steps, the share of two profiled steps' wall time the GPU spent in
    kernels). Against the trainer's figure it shows what the trainer's own per-step work costs; a low GPU share
    says the host's queueing of operations sets the pace."""
    from finetune.train.loss import batch_loss
    from finetune.train.main import base_precision_dtype, setup
    from finetune.train.optim import build_optimizer

    cfg = bench_config(pth, data, out, precision, B, T, steps, compile=compile)
    run = setup(cfg, quiet=True)
    model = run.model.to(device)
    opt, _ = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    dtype = base_precision_dtype(precision)
    batches = [{k: torch.stack([run.train_data[i * B + j][k] for j in range(B)]).to(device)
                for k in ("input_ids", "targets", "loss_mask")} for i in range(steps)]

    def step(batch):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = batch_loss(model, batch, cfg)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = []
    for i, batch in enumerate(batches):
        sync(device)
        t0 = time.perf_counter()
        step(batch)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    busy = "-"
    if device.type == "cuda":
        try:  # a profiler problem must not cost the row its speed figures
            busy = f"{100 * kernel_share(device, lambda: [step(b) for b in batches[:2]]):.0f}%"
        except Exception as e:
            busy = f"? ({type(e).__name__})"
    times.sort()
    return B * T / times[len(times) // 2], busy


def trainer_precision_section(device, big, compile: bool = False) -> list[str]:
    """Training speed of the trainer itself in fp32 (`precision: 32`, no TF32) and bf16-mixed, per family and shape
    (random checkpoints from `rwkv-lora init`, random tokens): the ratio users get from switching precision. With
    `compile`, every run (the plain loop's too) has `compile: true`: the warm-up steps then include compiling."""
    import tempfile

    from finetune.cli import main as cli_main

    if big:  # (arch, layers, width, vocab, B, T)
        shapes = [("7", 12, 768, 65536, 8, 1024), ("7", 12, 768, 65536, 1, 256), ("7", 24, 1024, 65536, 8, 1024),
                  ("7", 24, 2048, 65536, 4, 1024), ("4", 12, 768, 50277, 8, 1024)]
        steps, warmup = 12, 4
    else:
        shapes = [("7", 2, 128, 1000, 2, 32)]
        steps, warmup = 3, 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for arch, L, C, V, B, T in shapes:
            label = f"RWKV-{arch} {L}x{C}, vocab {V}"
            try:
                pth, data = work / f"v{arch}-{L}x{C}.pth", work / f"v{arch}-{V}"
                if not pth.exists():
                    cli_main(["init", "--arch", arch, "--n-layer", str(L), "--n-embd", str(C), "--vocab", str(V),
                              "--out", str(pth)])
                if not data.with_suffix(".bin").exists():
                    write_random_corpus(data, V, 4 << 20 if big else 1 << 14, seed=0)
                got = {}
                for precision in ("32", "bf16-mixed"):
                    t0 = time.perf_counter()
                    got[precision] = trainer_run(device, pth, data, work / f"out-{arch}-{L}-{B}-{T}-{precision}",
                                                 precision, B, T, steps, warmup, compile)
                    log(f"  {label} B={B} T={T} {precision}: {got[precision][0]:,.0f} tok/s "
                        f"({time.perf_counter() - t0:.0f} s)")
                loop = {precision: loop_run(device, pth, data, work / f"loop-{arch}-{L}-{B}-{T}-{precision}",
                                            precision, B, T, steps, warmup, compile)
                        for precision in ("32", "bf16-mixed")}
                (f32, p32, l32), (b16, pb16, lb16) = got["32"], got["bf16-mixed"]
                (lf32, busy32), (lb16_, busy16) = loop["32"], loop["bf16-mixed"]
                rows.append([label, f"{B}x{T}", f"{f32:,.0f}", f"{b16:,.0f}", f"**{b16 / f32:.2f}x**",
                             f"{lf32:,.0f} / {lb16_:,.0f} ({lb16_ / lf32:.2f}x)", f"{busy32} / {busy16}",
                             f"{p32:.2f} / {pb16:.2f}", f"{l32:.3f} / {lb16:.3f}"])
            except Exception as e:  # one shape failing (OOM, a missing package) must not hide the others
                rows.append([label, f"{B}x{T}", "-", "-", "-", "-", "-", "-",
                             f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"])
                log(f"  trainer {label} failed:\n{traceback.format_exc()}")
    return [f"## The trainer in fp32 and bf16-mixed{', compile: true' if compile else ''} (LoRA r=8 att+ffn, AdamW, "
            "median tokens/s of steps "
            f"{warmup + 1}-{steps} from metrics.csv; the plain loop: the same model, loss and optimizer without "
            "Lightning; GPU busy: kernel time / wall time over two profiled plain steps)\n\n" + table(
                ["model", "B x T", "fp32 tok/s", "bf16-mixed tok/s", "bf16 / fp32", "plain loop fp32 / bf16 tok/s",
                 "GPU busy fp32 / bf16", "peak GiB fp32 / bf16", "last loss fp32 / bf16"], rows)]


# ----------------------------------------------------------------------------------------------------------------------
# WKV-7

NAMES7 = ["y", "state_out", "g_r", "g_w", "g_k", "g_v", "g_a", "g_b", "g_state_in"]


def build7(device) -> tuple[object | None, float, str]:
    """The compiled WKV-7 extension for `device` (None when it fails), build/load seconds, and a note."""
    t0 = time.perf_counter()
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ext = wkv7_mod.kernel_for(device)
    note = "; ".join(str(w.message) for w in caught)
    return ext, time.perf_counter() - t0, note


def make_inputs7(B, T, H, dtype, w_dtype, device, seed, N=64):
    """Inputs as RWKV-7 makes them: w = -e^-0.5 sigmoid(w0) in [-0.61, 0], kk unit per head, a = -kk,
    b = kk * iclr; a random incoming state; random output gradients. r, k, v, a, b in `dtype`, w in `w_dtype`
    (bf16 values rounded once: the reference sees the same numbers)."""
    g = torch.Generator().manual_seed(seed)
    shape = (B, T, H, N)
    r = torch.randn(shape, generator=g)
    w = -math.exp(-0.5) * torch.sigmoid(torch.randn(shape, generator=g) * 2)
    k = torch.randn(shape, generator=g) * 0.5
    v = torch.randn(shape, generator=g)
    kk = torch.nn.functional.normalize(torch.randn(shape, generator=g), dim=-1)
    a, b = -kk, kk * torch.sigmoid(torch.randn(shape, generator=g))
    xs = [x.to(w_dtype if i == 1 else dtype) for i, x in enumerate((r, w, k, v, a, b))]
    state = torch.randn(B, H, N, N, generator=g) * 0.5
    gy = torch.randn(shape, generator=g)
    gstate = torch.randn(B, H, N, N, generator=g)
    return [x.to(device) for x in (*xs, state, gy, gstate)]


def run_wkv7(xs, state, gy, gstate, backend, ext=None):
    """y, state and the seven gradients through wkv7(backend), or through the extension `ext` when given."""
    leaves = [x.detach().clone().requires_grad_() for x in (*xs, state)]
    if ext is None:
        y, s = wkv7_mod.wkv7(*leaves, backend=backend)
    else:
        y, s = wkv7_mod.WKV7Kernel.apply(ext, True, *leaves)
    loss = (y.double() * gy.double()).sum() + (s.double() * gstate.double()).sum()
    return [y.detach(), s.detach(), *torch.autograd.grad(loss, leaves)]


def reference64_7(xs, state, gy, gstate, segment=512):
    """y, state and the seven gradients by the float64 reference's own autograd (on the inputs' device), `segment`
    steps at a time: the state is carried forward, its gradient passed back, so memory stays bounded at long T."""
    xs = [x.detach().double() for x in xs]
    s0, gy, g_state = state.detach().double(), gy.double(), gstate.double()
    T = xs[0].shape[1]
    bounds = list(range(0, T, segment)) + [T]
    states, ys = [s0], []
    with torch.no_grad():
        for t0, t1 in zip(bounds[:-1], bounds[1:]):
            y, s = wkv7_mod.wkv7_reference(*(x[:, t0:t1] for x in xs), states[-1])
            ys.append(y)
            states.append(s)
    grads = [torch.zeros_like(x) for x in xs]
    for i in reversed(range(len(bounds) - 1)):
        t0, t1 = bounds[i], bounds[i + 1]
        leaves = [x[:, t0:t1].clone().requires_grad_() for x in xs] + [states[i].clone().requires_grad_()]
        y, s = wkv7_mod.wkv7_reference(*leaves)
        parts = torch.autograd.grad((y * gy[:, t0:t1]).sum() + (s * g_state).sum(), leaves)
        for g, part in zip(grads, parts[:6]):
            g[:, t0:t1] = part
        g_state = parts[6]
    return [torch.cat(ys, 1), states[-1], *grads, g_state]


def correctness7(device, backend, cases) -> tuple[list[list], bool]:
    """Kernel vs float64 reference, every output NaN-poisoned by the CUDA binding. tol: 1e-5 for fp32 results,
    1e-2 for gradients returned in bf16 (rounded to 2^-8)."""
    rows, ok_all = [], True
    os.environ[POISON_ENV] = "1"
    try:
        for B, T, H, dtype, w_dtype in cases:
            t0 = time.perf_counter()
            *xs, state, gy, gstate = make_inputs7(B, T, H, dtype, w_dtype, device, seed=T * 7 + B)
            got = run_wkv7(xs, state, gy, gstate, backend)
            sync(device)
            want = reference64_7(xs, state, gy, gstate)
            errs = [rel_err(a, b) for a, b in zip(got, want)]
            tols = [1e-5 if x.dtype == torch.float32 else 1e-2 for x in got]
            nan = any(not torch.isfinite(x).all() for x in got)
            ok = not nan and all(e < t for e, t in zip(errs, tols))
            ok_all &= ok
            rows.append([f"B={B} T={T} H={H}", str(dtype).replace("torch.", ""), str(w_dtype).replace("torch.", ""),
                         *[f"{e:.1e}" for e in errs], "NaN!" if nan else "none", "PASS" if ok else "FAIL",
                         f"{time.perf_counter() - t0:.1f}"])
            log(f"  checked WKV-7 B={B} T={T} H={H} {dtype}/{w_dtype}: worst {max(errs):.1e} "
                f"{'PASS' if ok else 'FAIL'}")
    finally:
        os.environ.pop(POISON_ENV, None)
    return rows, ok_all


def throughput7(device, ext, shapes, reps) -> list[list]:
    """The extension's own calls: forward without and with the saved checkpoints, and backward."""
    rows = []
    K = ext.checkpoint_interval()
    for B, T, H in shapes:
        for dtype, w_dtype in ((torch.bfloat16, torch.float32), (torch.float32, torch.float32)):
            *xs, state, gy, gstate = make_inputs7(B, T, H, dtype, w_dtype, device, seed=1)
            _, _, ckpt, sa = ext.forward(*xs, state, True)
            cases = (("forward", lambda: ext.forward(*xs, state, False)),
                     ("forward, saving", lambda: ext.forward(*xs, state, True)),
                     ("backward", lambda: ext.backward(*xs, ckpt, sa, gy, gstate)))
            # memory: what the forward keeps for the backward; the CUDA backward's scratch (one block of K states
            # per (batch, head), freed on return)
            saved = f"{wkv7_mod.checkpoint_bytes(B, T, H, 64, K) / 2**20:.0f}"
            scratch = f"{B * H * K * 64 * 64 * 4 / 2**20:.0f}" if device.type == "cuda" else "-"
            for name, fn in cases:
                sec = timeit(fn, device, reps)
                rows.append([f"B={B} T={T} H={H}", f"{str(dtype)[6:]} (w {str(w_dtype)[6:]})", name,
                             f"{sec * 1e3:.3f}", f"{B * T / sec / 1e6:.2f}", f"{B * T * H / sec / 1e6:.1f}",
                             saved if name == "forward, saving" else "", scratch if name == "backward" else ""])
            del xs, state, gy, gstate, ckpt, sa
    return rows


def lanes7(device, default_ext, reps) -> tuple[list[list], bool]:
    """The row split of the CUDA kernel (WKV7_LANES in kernels/wkv7_cuda.cu: threads per row of the state, 4 in the
    shipped build) at 2, 4 and 8: each build checked against the float64 reference on one case (bf16, T = 1000,
    NaN-poisoned outputs), then timed at a 0.1B layer's shape (B=8 T=1024 H=12) and a 1.5B one (B=4 T=1024 H=32),
    bf16 with fp32 decays as bf16-mixed training runs it. Tells the next change of the default what it gains."""
    from torch.utils import cpp_extension

    rows, ok_all = [], True
    for lanes in (2, 4, 8):
        t0 = time.perf_counter()
        if lanes == 4:
            ext = default_ext
        else:
            ext = cpp_extension.load(name=f"rwkv_lora_gpu_check_wkv7_lanes{lanes}",
                                     sources=[str(kernel_build.KERNEL_DIR / f) for f in
                                              ("wkv7_cuda_bind.cpp", "wkv7_cuda.cu")],
                                     extra_cuda_cflags=[*kernel_build.cuda_compile_flags(), f"-DWKV7_LANES={lanes}"],
                                     verbose=False)
        build_s = time.perf_counter() - t0
        os.environ[POISON_ENV] = "1"
        try:
            *xs, state, gy, gstate = make_inputs7(2, 1000, 3, torch.bfloat16, torch.float32, device, seed=5)
            got = run_wkv7(xs, state, gy, gstate, "kernel", ext=ext)
            want = reference64_7(xs, state, gy, gstate)
        finally:
            os.environ.pop(POISON_ENV, None)
        worst = max(rel_err(a, b) / (1e-5 if a.dtype == torch.float32 else 1e-2) for a, b in zip(got, want))
        ok = worst < 1 and all(torch.isfinite(x).all() for x in got)
        ok_all &= ok
        times = []
        for B, T, H in ((8, 1024, 12), (4, 1024, 32)):
            *xs, state, gy, gstate = make_inputs7(B, T, H, torch.bfloat16, torch.float32, device, seed=1)
            _, _, ckpt, sa = ext.forward(*xs, state, True)
            times += [timeit(lambda: ext.forward(*xs, state, True), device, reps),
                      timeit(lambda: ext.backward(*xs, ckpt, sa, gy, gstate), device, reps)]
            del xs, state, gy, gstate, ckpt, sa
        rows.append([str(lanes) + (" (shipped)" if lanes == 4 else ""), f"{build_s:.0f}",
                     f"{worst:.2f}", "PASS" if ok else "FAIL", *[f"{t * 1e3:.3f}" for t in times]])
        log(f"  WKV-7 with {lanes} lanes per row: {rows[-1]}")
    return rows, ok_all


def wkv7_sections(device, big, report, reps) -> bool:
    """Build, correctness and timing of the WKV-7 kernel; appends to `report`, returns whether it is correct."""
    log(f"\nbuilding the {device.type} WKV-7 kernel ...")
    ext, build_s, note = build7(device)
    rows = [["kernel build / load (s)", f"{build_s:.1f}"], ["kernel", "compiled" if ext else f"NONE: {note}"]]
    if ext is not None:
        rows.append(["checkpoint interval K", str(ext.checkpoint_interval())])
    report.append("## WKV-7: build\n\n" + table(["", ""], rows))
    log(report[-1])
    if ext is None:
        return not big  # on a GPU the kernel must build; the CPU dry run may fall back to the reference
    backend = "kernel"
    f32, bf16 = torch.float32, torch.bfloat16
    if big:  # B*H = 6 blocks; T = 33 and 1000 are not multiples of 16
        cases = [(2, T, 3, dt, wdt) for T in (1, 33, 1000, 4096) for dt, wdt in ((f32, f32), (bf16, f32))]
        cases += [(2, 1000, 3, bf16, bf16), (1, 16384, 2, bf16, f32)]
    else:
        cases = [(2, 1, 3, f32, f32), (2, 21, 3, f32, f32), (1, 21, 2, bf16, f32), (1, 21, 2, bf16, bf16)]
    log(f"\nWKV-7 correctness ({backend} vs float64 reference, outputs poisoned with NaN) ...")
    rows, ok = correctness7(device, backend, cases)
    report.append("## WKV-7: correctness (relative error: max |diff| / max |ref|; tol 1e-5 for fp32 results, 1e-2 "
                  "for gradients returned in bf16)\n\n" + table(
                      ["shape", "dtype", "w dtype", *NAMES7, "NaN", "result", "s"], rows))
    log(report[-1])
    log("\nWKV-7 kernel time ...")
    shapes = [(8, 1024, 12), (8, 4096, 32), (1, 16384, 32)] if big else [(1, 16, 2)]
    try:
        rows = throughput7(device, ext, shapes, reps)
        report.append("## WKV-7: kernel time (N = 64)\n\n" + table(
            ["shape", "dtype", "pass", "ms", "Mtok/s", "M head-steps/s", "saved for backward MiB",
             "backward scratch MiB"], rows))
    except Exception:
        report.append("## WKV-7: kernel time\n\nFAILED:\n```\n" + traceback.format_exc() + "```")
    log(report[-1])
    if device.type == "cuda":
        log("\nWKV-7 threads per row of the state ...")
        try:
            rows, lanes_ok = lanes7(device, ext, reps)
            ok &= lanes_ok
            report.append("## WKV-7: threads per row of the state (bf16, w fp32; ms; error as a fraction of the "
                          "tolerance)\n\n" + table(
                              ["lanes", "build s", "worst error / tol", "result", "fwd+save 8x1024x12",
                               "bwd 8x1024x12", "fwd+save 4x1024x32", "bwd 4x1024x32"], rows))
        except Exception:
            report.append("## WKV-7: threads per row\n\nFAILED:\n```\n" + traceback.format_exc() + "```")
        log(report[-1])
    return ok

# ----------------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--skip-train", action="store_true", help="no LoRA training-step benchmark")
    ap.add_argument("--skip-wkv7", action="store_true", help="no WKV-7 sections")
    ap.add_argument("--wkv7-only", action="store_true", help="only the WKV-7 sections")
    ap.add_argument("--trainer-only", action="store_true",
                    help="only the trainer's fp32 vs bf16-mixed speed (RWKV-7 and RWKV-4)")
    ap.add_argument("--skip-trainer", action="store_true", help="no trainer fp32 vs bf16-mixed section")
    ap.add_argument("--trainer-compile", action="store_true",
                    help="run the trainer section with compile: true (torch.compile of every block)")
    ap.add_argument("--bandwidth-tbs", type=float, default=4.8, help="memory bandwidth for the floor (H200: 4.8)")
    ap.add_argument("--out", type=Path, help="also write the Markdown report here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    big = device.type == "cuda"

    report = []
    env = [["torch", torch.__version__], ["torch CUDA", torch.version.cuda], ["device", str(device)]]
    if big:
        env += [["GPU", torch.cuda.get_device_name(device)],
                ["capability", "sm_%d%d" % torch.cuda.get_device_capability(device)]]
    env += [["nvcc", kernel_build.find_nvcc()]]
    if big:
        env += [["nvcc flags", " ".join(kernel_build.cuda_compile_flags(kernel_build.find_nvcc()))]]

    if args.trainer_only:
        report.append("## Environment\n\n" + table(["", ""], env))
        log(report[-1])
        log("\nthe trainer in fp32 and bf16-mixed ...")
        report += trainer_precision_section(device, big, args.trainer_compile)
        log(report[-1])
        return finish(report, "FAILED" not in report[-1], args.out)

    if args.wkv7_only:
        report.append("## Environment\n\n" + table(["", ""], env))
        log(report[-1])
        ok = wkv7_sections(device, big, report, reps=10 if big else 2)
        return finish(report, ok, args.out)

    log(f"building the {device.type} WKV kernel ...")
    ext, build_s, note = build(device)
    env += [["kernel build / load (s)", f"{build_s:.1f}"], ["kernel", "compiled" if ext else f"NONE: {note}"]]
    report.append("## Environment\n\n" + table(["", ""], env))
    log(report[-1])
    if ext is None and big:
        log("\nthe CUDA kernel did not build: nothing to check")
        return 1
    backend = "kernel" if ext is not None else "reference"

    # --- correctness: B*C = 231, not a multiple of 32
    Ts = [1, 333, 4096, 16384] if big else [1, 33]
    cases = [(3, T, 77, dt, i % 2 == 1) for i, T in enumerate(Ts) for dt in (torch.float32, torch.bfloat16)]
    cases.append((1, 333 if big else 33, 77, torch.float32, True))
    log("\nfloat64 references: numpy recurrence vs autograd ...")
    x = make_inputs(2, 333 if big else 33, 77, torch.float32, True, torch.device("cpu"), seed=5)
    x[6] = consistent_gstate(x[6], wkv_reference(*x[:5])[1])
    ref_errs = [rel_err(a, b) for a, b in zip(recurrence64(*x), reference64(*x))]
    ref_ok = max(ref_errs) < 1e-10
    ok_refs = [["recurrence64 vs autograd (float64), B=2 T=%d C=77" % x[2].shape[1],
                f"{max(ref_errs):.1e}", "1e-10", "PASS" if ref_ok else "FAIL"]]
    report.append("## float64 references agree\n\n" + table(["check", "max rel err", "tol", "result"], ok_refs))
    log(report[-1])
    log(f"\ncorrectness ({backend} vs float64 reference, outputs poisoned with NaN) ...")
    rows, ok = correctness(device, backend, cases, AUTOGRAD_T_MAX if big else 16)
    ok &= ref_ok
    report.append("## Correctness (relative error: max |diff| / max |ref|; tol = max(1e-5 fp32 / 1e-2 bf16, 4 x fp32 floor))\n\n" + table(
        ["shape", "dtype", "state in", "f64 ref", *NAMES, "fp32 floor", "tol", "NaN", "result", "s"], rows))
    log(report[-1])

    # --- kernel throughput
    log("\nkernel throughput ...")
    shapes = [(8, 1024, 768), (8, 4096, 2048), (1, 16384, 2048)] if big else [(2, 16, 8)]
    try:
        rows = throughput(device, ext, shapes, args.bandwidth_tbs * 1e12, reps=10 if big else 2)
        report.append(f"## Kernel time vs the memory-bandwidth floor ({args.bandwidth_tbs} TB/s)\n\n" + table(
            ["shape", "dtype", "pass", "ms", "GB/s", "floor ms", "of floor", "Mtok*ch/s"], rows))
    except Exception:
        report.append("## Kernel throughput\n\nFAILED:\n```\n" + traceback.format_exc() + "```")
    log(report[-1])

    # --- WKV-5/6
    parts, ok6 = wkv6_section(device, big)
    report += parts
    ok &= ok6

    # --- WKV-7 (before the training step: a crash there must not hide it)
    if not args.skip_wkv7:
        ok &= wkv7_sections(device, big, report, reps=10 if big else 2)

    # --- LoRA training step
    if not args.skip_train:
        log("\nLoRA training step (bf16, r=8 on att/ffn key/value/receptance/output, AdamW) ...")
        shapes = ([("169M", 12, 768, 50277, 8, 1024), ("1.5B", 24, 2048, 50277, 4, 1024)] if big
                  else [("tiny", 2, 64, 1000, 2, 16)])
        try:
            rows = train_step_bench(device, shapes, steps=5 if big else 1, warmup=2 if big else 1)
            report.append("## LoRA training step\n\n" + table(
                ["model", "layers x dim", "params / trainable", "B x T", "warm-up s", "ms/step", "tokens/s",
                 "peak GiB", "loss"], rows))
        except Exception:
            report.append("## LoRA training step\n\nFAILED:\n```\n" + traceback.format_exc() + "```")
        log(report[-1])

    # --- the trainer, fp32 against bf16-mixed
    if not args.skip_trainer:
        log("\nthe trainer in fp32 and bf16-mixed ...")
        report += trainer_precision_section(device, big, args.trainer_compile)
        log(report[-1])

    return finish(report, ok, args.out)


def finish(report: list[str], ok: bool, out: Path | None) -> int:
    text = "\n\n".join(report) + f"\n\nOverall correctness: {'PASS' if ok else 'FAIL'}\n"
    log("\n" + "=" * 100 + "\n\n" + text)
    if out:
        out.write_text(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
