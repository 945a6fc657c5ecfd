"""Fine-tune an RWKV-4: `python train.py --config recipes/demo.yaml [--key value ...]` (same as `rwkv-lora train`)."""

import sys

from finetune.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
