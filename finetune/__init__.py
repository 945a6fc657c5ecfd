"""rwkv-lora: LoRA fine-tuning for RWKV-4 language models.

`from finetune import load_model` is the public entry point; submodules are imported lazily so that the CLI and the
data tools start fast.
"""

from finetune.errors import FinetuneError

__all__ = ["RWKV", "RWKVConfig", "load_model", "FinetuneError"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("RWKV", "RWKVConfig", "load_model"):
        from finetune import model

        return getattr(model, name)
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")
