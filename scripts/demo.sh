#!/usr/bin/env bash
# The main job on the bundled demo, end to end (sets up .venv first if needed; VENV=path to use another one):
#   1. `rwkv-lora init` a tiny RWKV-4 (4 x 128, vocab 1024 of the demo tokenizer)
#   2. `rwkv-lora prepare` both demo corpora (fables, recipes) with the demo tokenizer, holding out a slice of each
#   3. pretrain the tiny model in full on the fables       (recipes/demo-pretrain.yaml)
#   4. LoRA-tune it on the recipes                          (recipes/demo.yaml)
#   5. print a continuation from the base and from base + adapter, side by side
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VENV:-}" ]; then
  bash scripts/setup.sh
  VENV=.venv
fi
. "$VENV/bin/activate"
PY="$VENV/bin/python"
rwkv-lora() { "$PY" -m finetune.cli "$@"; }   # this checkout's code, whichever venv
T0=$(date +%s)
TOK=data/demo-tokenizer/tokenizer.json
mkdir -p out/demo
rm -rf out/demo/pretrain out/demo/lora
rwkv-lora init --n-layer 4 --n-embd 128 --vocab 1024 --seed 0 --out out/demo/base.pth

# hold out the last tenth of each corpus's documents for the validation loss
"$PY" - <<'PY'
for name in ("fables", "recipes"):
    docs = open(f"data/{name}/{name}.txt", encoding="utf-8").read().split("\n***\n")
    cut = len(docs) - max(len(docs) // 10, 2)
    for part, chunk in (("train", docs[:cut]), ("val", docs[cut:])):
        with open(f"out/demo/{name}-{part}.txt", "w", encoding="utf-8") as f:
            f.write("\n***\n".join(chunk))
PY
for name in fables recipes; do
  # --force: a second run of the demo replaces the data the first one prepared
  rwkv-lora prepare "out/demo/$name-train.txt" --doc-separator '\n***\n' --tokenizer $TOK --out "out/demo/$name" --force
  rwkv-lora prepare "out/demo/$name-val.txt" --doc-separator '\n***\n' --tokenizer $TOK --out "out/demo/$name-val" \
    --force
done

echo "== pretraining the tiny model on the fables (all weights)"
rwkv-lora train --config recipes/demo-pretrain.yaml ${PRETRAIN_ARGS:-}
cp out/demo/pretrain/final/model.pth out/demo/pretrained.pth

echo "== LoRA on the recipes"
rwkv-lora train --config recipes/demo.yaml ${LORA_ARGS:-}
rwkv-lora info out/demo/lora/final

echo "== the same prompt, same seed: base vs base + adapter"
"$PY" scripts/demo_compare.py out/demo/pretrained.pth out/demo/lora/final $TOK --prompt "The " --tokens 80
echo "loss curves: out/demo/pretrain/loss.png, out/demo/lora/loss.png; demo took $(( $(date +%s) - T0 ))s"
