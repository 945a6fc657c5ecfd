"""Hugging Face `transformers` directories: RwkvForCausalLM weights, config and a tokenizer it can load.

    model.safetensors       the checkpoint's tensors under transformers' names (`hf_name`)
    config.json             RwkvConfig with rescale_every = 0, so the logits equal BlinkDL's
    tokenizer.json          a `tokenizers` file: the adapter's own, or the World tokenizer written as one
    tokenizer_config.json   what AutoTokenizer needs (the fast tokenizer class; id 0 as end of text)

The World tokenizer (`rwkv_vocab_v20230424`) is greedy longest match over UTF-8 bytes. transformers has no class for
it, but `tokenizers` can express it exactly: the bytes mapped to printable characters (ByteLevel without its word
regex), then WordPiece with an empty continuation prefix, which is greedy longest-match-first. WordPiece's search is
quadratic in the length of a pre-tokenized word, so the text is first split before every space that follows a
non-space character: no World token contains a non-whitespace byte followed by a space (checked when the file is
built), so no token can cross such a split and the ids stay exactly the World tokenizer's. Text without spaces
(Chinese, long symbol runs) stays one word: correct, but slow past a few thousand characters.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from finetune.errors import FinetuneError

WORLD_EOD = "<|endoftext|>"  # the name given to id 0 (end of document), as in the 20B tokenizer


def hf_name(key: str) -> str:
    """BlinkDL checkpoint name -> Hugging Face RwkvForCausalLM name."""
    if key == "head.weight":
        return key
    if key.startswith("emb."):
        return "rwkv.embeddings." + key[4:]
    key = key.replace(".ln0.", ".pre_ln.").replace(".att.", ".attention.").replace(".ffn.", ".feed_forward.")
    for short, long in (("k", "key"), ("v", "value"), ("r", "receptance")):
        if key.endswith(f".time_mix_{short}"):
            key = key[: -len(short)] + long
    return "rwkv." + key


def hf_config(config: Any, dtype: torch.dtype) -> dict[str, Any]:
    """config.json for an RWKV-4 of `config` (n_layer, n_embd, vocab_size, dim_ffn)."""
    return {
        "architectures": ["RwkvForCausalLM"], "model_type": "rwkv",
        "vocab_size": config.vocab_size, "hidden_size": config.n_embd, "num_hidden_layers": config.n_layer,
        "attention_hidden_size": config.n_embd, "intermediate_size": config.dim_ffn, "context_length": 4096,
        "layer_norm_epsilon": 1e-5, "bos_token_id": 0, "eos_token_id": 0, "rescale_every": 0,
        "tie_word_embeddings": False, "use_cache": True,
        "dtype": str(dtype).replace("torch.", ""),
    }


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 byte values to printable characters (what ByteLevel uses)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def world_tokenizer_json(vocab: dict[int, bytes]) -> str:
    """The World tokenizer as a `tokenizers` JSON document (see the module docstring). `vocab`: id -> token bytes,
    as `finetune.tokenizer.read_world_vocab` returns it."""
    spaces = b" \t\n\r\x0b\x0c"
    crossing = [raw for raw in vocab.values() for j in range(1, len(raw)) if raw[j] == 0x20 and raw[j - 1] not in
                spaces]
    if crossing:  # another vocabulary: the split before spaces would change the ids
        raise FinetuneError(f"the World vocabulary has tokens such as {crossing[0]!r} that cross a word boundary; "
                            f"cannot write it as a tokenizer.json")
    to_char = _bytes_to_unicode()
    table = {WORLD_EOD: 0}
    for i, raw in vocab.items():
        table["".join(to_char[b] for b in raw)] = i
    tok = Tokenizer(models.WordPiece(table, unk_token=WORLD_EOD, continuing_subword_prefix="",
                                     max_input_chars_per_word=1 << 30))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"(?<=[^\s]) "), behavior="merged_with_next"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


def tokenizer_config(tokenizer_json: str) -> dict[str, Any]:
    """tokenizer_config.json for a tokenizer.json: the fast tokenizer class, id 0 (end of document) as eos/bos."""
    try:
        tok = Tokenizer.from_str(tokenizer_json)
    except Exception as e:  # tokenizers raises plain Exceptions
        raise FinetuneError(f"the tokenizer.json to write is not a valid tokenizers file ({e})") from None
    eod = tok.id_to_token(0)
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 30,
                              "clean_up_tokenization_spaces": False}
    if eod is not None:
        config.update(eos_token=eod, bos_token=eod, unk_token=eod)
    return config


def tokenizer_vocab_size(tokenizer_json: str) -> int:
    return Tokenizer.from_str(tokenizer_json).get_vocab_size(with_added_tokens=True)


def write_tokenizer_files(directory: Path, tokenizer_json: str) -> None:
    """tokenizer.json and tokenizer_config.json into `directory` (a temporary from `finetune.atomic`)."""
    (directory / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(tokenizer_json), indent=2) + "\n")
