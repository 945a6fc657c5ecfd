"""`rwkv-lora merge --format hf` for RWKV-7: the Hugging Face directory written by rwkv7-hf's own converter.

transformers has no RWKV-7 architecture of its own. The `rwkv7-hf` package (an optional extra: `pip install
'rwkv-lora[hf7]'`) converts a BlinkDL x070 `.pth` into a self-contained directory (config, safetensors, its
modeling/cache/operator/tokenizer files) that `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`
loads with nothing but torch and transformers. We write the merged `.pth` (streamed, as `merge` always does) and hand
it to that converter, rather than keeping a modeling file of our own in step with theirs.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Callable

import torch

from finetune.errors import FinetuneError, first_line
from finetune.hf import write_tokenizer_files

HF7_EXTRA = "pip install 'rwkv-lora[hf7]'  (rwkv7-hf==0.9.0)"
_PRECISIONS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# what rwkv7-hf writes for its World tokenizer, replaced when the model comes with another tokenizer
_RWKV7_TOKENIZER_FILES = ("tokenization_rwkv7.py", "special_tokens_map.json", "tokenizer_config.json")


def write_rwkv7_hf_dir(out_dir: Path, write_pth: Callable[[Path], None], dtype: torch.dtype,
                       tokenizer_json: str | None, where: str | Path,
                       log: Callable[[str], None] | None = None) -> None:
    """Fill `out_dir` (an empty temporary directory of `merge`'s, renamed to `where` afterwards) with rwkv7-hf's
    conversion of the merged model. `write_pth(path)` writes the merged BlinkDL `.pth`; it is converted to `dtype`
    and removed again. `tokenizer_json` None: the World tokenizer (every published RWKV-7), rwkv7-hf's own tokenizer
    class with the World vocabulary file; else that tokenizer.json with transformers' fast tokenizer class in place
    of rwkv7-hf's, so `AutoTokenizer` loads either way."""
    try:
        from rwkv7_hf.converter import main as convert
    except ImportError:
        raise FinetuneError(f"{where}: writing an RWKV-7 model as a Hugging Face directory needs rwkv7-hf: "
                            f"{HF7_EXTRA}") from None
    if dtype not in _PRECISIONS:
        raise FinetuneError(f"{where}: rwkv7-hf converts to fp32, fp16 or bf16, not {dtype}")
    merged = out_dir / ".merged.pth"  # inside the temporary directory: removed with it on any failure
    write_pth(merged)
    args = ["--input", str(merged), "--output", str(out_dir), "--precision", _PRECISIONS[dtype], "--low-memory"]
    if tokenizer_json is None:
        from finetune.tokenizer import _world_vocab_path

        args += ["--vocab-file", _world_vocab_path()]
    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said):  # its one progress line would interleave with ours
            convert(args)
    except (Exception, SystemExit) as e:
        raise FinetuneError(f"{where}: rwkv7-hf could not convert the merged model ({first_line(e)})") from None
    finally:
        merged.unlink(missing_ok=True)
    if tokenizer_json is not None:
        for name in _RWKV7_TOKENIZER_FILES:  # its World tokenizer class and special tokens (<|padding|>, ...)
            (out_dir / name).unlink(missing_ok=True)
        write_tokenizer_files(out_dir, tokenizer_json)
    if log is not None:
        log(f"converted with rwkv7-hf ({_PRECISIONS[dtype]}); load it with AutoModelForCausalLM.from_pretrained(DIR, "
            f"trust_remote_code=True)")
