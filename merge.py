#!/usr/bin/env python
"""Merge adapters into a base RWKV checkpoint (4, 5.2, 6 or 7): the same as `rwkv-lora merge` (see finetune/merge.py).

    python merge.py --base base.pth --adapter DIR [--adapter DIR2:0.5 ...] --out merged.pth
                    [--dtype fp16|bf16|fp32] [--format pth|safetensors|hf] [--force] [--overwrite]
"""

import sys

from finetune.cli import main

if __name__ == "__main__":
    sys.exit(main(["merge", *sys.argv[1:]]))
