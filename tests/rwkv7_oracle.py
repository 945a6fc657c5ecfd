"""Worker: BlinkDL's `rwkv` package (0.8.32, RWKV-7, `cpu fp32`) on one or more checkpoints, in its own process.

    python tests/rwkv7_oracle.py JOBS.json

JOBS.json is a list of {"model": checkpoint path WITHOUT ".pth", "tokens": [int, ...], "out": result path} with an
optional "state": a torch.save'd list of 3 * L tensors to start from (the package's own state list; None = its zero
state). For each job the package runs `forward(tokens, state, full_output=True)` and {"logits": [T, V], "state": its
list of 3 * L tensors (att shift [C], WKV [H, N, N], ffn shift [C] per layer)} is written to "out" with torch.save.

The package only builds RWKV-7 when RWKV_V7_ON=1 is set before `import rwkv.model` (and then it must not also serve
RWKV-4 in the same process), hence a subprocess. Give it fp32 files.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["RWKV_V7_ON"] = "1"
os.environ["RWKV_JIT_ON"] = "0"
os.environ["RWKV_CUDA_ON"] = "0"


def main(jobs_path: str) -> None:
    import torch
    from rwkv.model import RWKV

    with open(jobs_path) as f:
        jobs = json.load(f)
    for job in jobs:
        model = RWKV(model=job["model"], strategy="cpu fp32")
        start = None
        if job.get("state"):
            start = [t.float().contiguous() for t in torch.load(job["state"], weights_only=True)]
        with torch.no_grad():
            logits, state = model.forward(list(job["tokens"]), start, full_output=True)
        torch.save({"logits": logits.float(), "state": [s.float() for s in state]}, job["out"])


if __name__ == "__main__":
    main(sys.argv[1])
