"""Fine-tune an RWKV (4, 5.2, 6 or 7): `python train.py --config recipes/demo.yaml [--key value ...]`, the same as
`rwkv-lora train`."""

import sys

from finetune.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
