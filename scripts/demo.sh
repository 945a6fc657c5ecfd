#!/usr/bin/env bash
# The main job on the bundled demo, end to end (sets up .venv first if needed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
mkdir -p out/demo
rwkv-lora init --n-layer 4 --n-embd 128 --vocab 1024 --seed 0 --out out/demo/base.pth
rwkv-lora info out/demo/base.pth
python - <<'PY'
import torch
from finetune import load_model
model = load_model("out/demo/base.pth")
logits = model(torch.tensor([[1, 2, 3, 4]]))
print("forward pass ok:", tuple(logits.shape))
PY
