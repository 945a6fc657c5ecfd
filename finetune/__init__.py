"""rwkv-lora: LoRA fine-tuning for RWKV language models.

`from finetune import load_model` is the public entry point; submodules are imported lazily so that the CLI and the
data tools start fast.
"""

from finetune.errors import FinetuneError

__all__ = ["RWKV", "RWKVConfig", "load_model", "FinetuneError"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # imported on first use so that `import finetune.<module>` stays light (the CLI and data tools start fast)
    if name == "load_model":
        from finetune.plugin import load_model

        return load_model
    if name in ("RWKV", "RWKVConfig"):
        from finetune.models import rwkv4

        return getattr(rwkv4, name)
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")
