"""Issue 13's yardstick on the CPU: a LoRA training step of a 12 x 768 RWKV-6 (vocab 65536, r=8 on receptance, key,
value, gate, output, batch 1, ctx 1024, fp32) with the WKV-5/6 kernel, against the same step with the WKV replaced by
a stand-in that costs nothing.

    python bench/wkv6_step.py [--rounds 3]

Needs the RWKV-6 model (`finetune.models.rwkv6`). Two stand-ins: "identity" (y = r, the issue's wording: k, v and the
decays then drop out of the graph, so their projections' backward is skipped too) and "identity_all" (y = r + k + v
+ w + u: as cheap, but everything the WKV reads stays in the graph). The variants alternate step by step; times are
medians of wall and process-CPU seconds. On a shared machine whole-step times swing by tens of percent, so the
script also times the kernel's own calls inside the kernel steps (the WKV's share of the step, the robust figure).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from finetune.ops import wkv6 as W  # noqa: E402

V, T = 65536, 1024


class TimedExtension:
    """The compiled extension with its calls' wall and process-CPU seconds added up."""

    def __init__(self, ext):
        self.ext, self.wall, self.cpu = ext, 0.0, 0.0

    def _timed(self, fn, *args):
        t, c = time.perf_counter(), time.process_time()
        out = fn(*args)
        self.wall += time.perf_counter() - t
        self.cpu += time.process_time() - c
        return out

    def forward(self, *args):
        return self._timed(self.ext.forward, *args)

    def backward(self, *args):
        return self._timed(self.ext.backward, *args)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="timed steps per variant (after one warm-up round)")
    args = ap.parse_args(argv)
    try:
        import finetune.models.rwkv6 as M
    except ImportError:
        sys.exit("needs the RWKV-6 model (finetune/models/rwkv6.py)")
    from peft import LoraConfig, get_peft_model

    ext = W.kernel_for(torch.device("cpu"))
    if ext is None:
        sys.exit("the CPU WKV-5/6 kernel could not be built")
    timed = TimedExtension(ext)
    W.kernel_for = lambda device: timed  # noqa: E731  (the model's wkv6 looks the kernel up on every call)

    def identity(r, w, k, v, u, state=None):
        return r.float(), state

    def identity_all(r, w, k, v, u, state=None):
        return r.float() + k.float() + v.float() + w + u, state

    torch.manual_seed(0)
    model = M.RWKV6(M.RWKV6Config(n_layer=12, n_embd=768, vocab_size=V))
    M.init_rwkv_lm_(model)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16,
                                             target_modules=["receptance", "key", "value", "gate", "output"]))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(1)
    variants = {"kernel": M.wkv6, "identity": identity, "identity_all": identity_all}
    wall = {k: [] for k in variants}
    cpu = {k: [] for k in variants}
    share = []
    print(f"RWKV-6 12 x 768, LoRA r=8, B=1, T={T}, fp32, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for rnd in range(args.rounds + 1):
        for name, fn in variants.items():
            M.wkv6 = fn
            batch = torch.randint(0, V, (1, T + 1), generator=g)
            timed.wall = timed.cpu = 0.0
            t0, c0 = time.perf_counter(), time.process_time()
            logits = model(batch[:, :-1])
            F.cross_entropy(logits.reshape(-1, V).float(), batch[:, 1:].reshape(-1)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            dw, dc = time.perf_counter() - t0, time.process_time() - c0
            print(f"round {rnd} {name}: {dw:.2f} s wall, {dc:.2f} s cpu"
                  + (f" (WKV calls: {timed.wall:.2f} s wall, {timed.cpu:.2f} s cpu)" if name == "kernel" else ""),
                  flush=True)
            if rnd > 0:  # round 0 warms up
                wall[name].append(dw)
                cpu[name].append(dc)
                if name == "kernel":
                    share.append(timed.cpu / dc)
    print("\n| variant | median wall (s) | median cpu (s) | kernel step vs this (cpu) |")
    print("|---|---:|---:|---:|")
    for name in variants:
        ratio = statistics.median(cpu["kernel"]) / statistics.median(cpu[name])
        print(f"| {name} | {statistics.median(wall[name]):.2f} | {statistics.median(cpu[name]):.2f} | {ratio:.2f}x |")
    print(f"\nThe WKV kernel's own calls: {100 * statistics.median(share):.1f}% of the kernel step's CPU time.")


if __name__ == "__main__":
    main()
