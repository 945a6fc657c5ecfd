"""Text generation and chat in RNN mode, with adapters plugged in unmerged (or none).

    rwkv-lora generate --model base.pth [--adapter DIR[:W] ...] --prompt TEXT [--tokenizer world|PATH]
                       [--max-tokens N] [--temperature T] [--top-p P] [--top-k K] [--presence-penalty A]
                       [--frequency-penalty A] [--stop STR ...] [--seed S]
    rwkv-lora chat --model base.pth [--adapter DIR] [--format raven|world] < questions.txt

The prompt is fed in parallel mode in chunks (`model.prefill`), then one token at a time through `model.step`: both
are the model's own forward (a length-1 window takes a fast path inside it), for every RWKV generation; so a prompt
longer than any training ctx_len just works.

Sampling (ChatRWKV's conventions): temperature 0 = greedy; otherwise logits / T, top-k, then top-p (nucleus), then a
draw. Penalties on the tokens generated so far: logits[t] -= alpha_presence + count[t] * alpha_frequency.
Generation stops at max tokens, at the end-of-document token 0, or when the text contains a stop string (which is
not printed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch

from finetune.errors import FinetuneError
from finetune.models import RNNState

CHAT_FORMATS = {"raven": ("Bob", "Alice"), "world": ("User", "Assistant")}


# ----------------------------------------------------------------------------------------------------------------------
# Sampling


def sample_logits(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                  generator: torch.Generator | None = None) -> int:
    """One token id from logits [V]. temperature 0 (or below) is greedy."""
    logits = logits.float()
    if temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits / temperature
    if top_k and 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if 0 < top_p < 1:
        sorted_p, order = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_p, dim=-1)
        drop = cum - sorted_p >= top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def generate_tokens(model, prompt: Sequence[int], max_tokens: int = 100, temperature: float = 1.0,
                    top_p: float = 1.0, top_k: int = 0, presence_penalty: float = 0.0,
                    frequency_penalty: float = 0.0, seed: int | None = None, state: RNNState | None = None,
                    stop_token: int | None = 0, chunk_len: int = 1024) -> Iterator[tuple[int, RNNState]]:
    """Yield (token, state the token was sampled from: the prompt and the tokens before it) one at a time.

    The prompt goes through `model.prefill` (parallel mode, chunked); every generated token through `model.step`.
    """
    if len(prompt) == 0:
        raise FinetuneError("the prompt is empty (nothing to condition on)")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    logits, state = model.prefill(torch.as_tensor(list(prompt)), state, chunk_len=chunk_len)
    logits = logits[0].float()
    counts: dict[int, float] = {}
    for _ in range(max_tokens):
        if counts and (presence_penalty or frequency_penalty):
            idx = torch.tensor(list(counts))
            pen = presence_penalty + frequency_penalty * torch.tensor(list(counts.values()))
            logits = logits.clone()
            logits[idx] -= pen
        token = sample_logits(logits, temperature, top_p, top_k, gen)
        if stop_token is not None and token == stop_token:
            return
        yield token, state
        counts[token] = counts.get(token, 0.0) + 1.0
        out, state = model.step([token], state)
        logits = out[0]


def generate_text(model, tokenizer, prompt: str, max_tokens: int = 100, stop: Iterable[str] = (),
                  on_text: Callable[[str], None] | None = None, state: RNNState | None = None,
                  **sampling) -> tuple[str, list[int], RNNState]:
    """Generate from a text prompt. Text is passed to `on_text` as soon as it is final (not the start of a stop
    string, not an incomplete UTF-8 character). Returns (text without the stop string, token ids, state after
    the prompt)."""
    stop = [s for s in stop if s]
    ids: list[int] = []
    emitted = 0
    text = ""
    prompt_state = None
    for token, st in generate_tokens(model, tokenizer.encode(prompt), max_tokens=max_tokens, state=state,
                                     **sampling):
        if prompt_state is None:
            prompt_state = st
        ids.append(token)
        text = tokenizer.decode(ids)
        hit = min((text.find(s) for s in stop if s in text), default=-1)
        if hit >= 0:
            text = text[:hit]
            break
        safe = len(text.rstrip("\ufffd"))  # an incomplete UTF-8 character decodes to U+FFFD: wait for the rest
        hold = 0
        for s in stop:  # hold back a suffix that could grow into a stop string
            for n in range(min(len(s) - 1, safe), 0, -1):
                if text[:safe].endswith(s[:n]):
                    hold = max(hold, n)
                    break
        safe -= hold
        if on_text is not None and safe > emitted:
            on_text(text[emitted:safe])
            emitted = safe
    if on_text is not None and len(text) > emitted:
        on_text(text[emitted:])
    return text, ids, prompt_state


# ----------------------------------------------------------------------------------------------------------------------
# Loading for the CLI


def resolve_tokenizer(arg: str | None, adapters: Sequence, vocab_size: int):
    from finetune.tokenizer import load_tokenizer

    tok = None
    if arg is None:  # the tokenizer the adapters record (and carry), wherever they were trained
        from finetune.adapters import adapter_tokenizer, parse_adapter_spec, read_adapter

        for a in adapters:
            tok = adapter_tokenizer(read_adapter(parse_adapter_spec(a)[0]))
            if tok is not None:
                break
    if tok is None:
        spec = arg
        if spec is None:
            if vocab_size == 65536:
                spec = "world"
            else:
                raise FinetuneError(f"no tokenizer given and the model's vocabulary ({vocab_size}) is not World's; "
                                    f"pass --tokenizer PATH/tokenizer.json")
        if spec.startswith("world"):
            spec = "world"
        elif not spec.endswith(".json") or not Path(spec).is_file():
            raise FinetuneError(f"tokenizer {spec!r} is not 'world' nor a tokenizer.json file here")
        tok = load_tokenizer(spec)
    if tok.vocab_size > vocab_size:
        raise FinetuneError(f"tokenizer {tok.name} has {tok.vocab_size} tokens but the model only {vocab_size}")
    return tok


def load_for_generation(args: argparse.Namespace):
    from finetune.adapters import attach_adapters, load_model
    from finetune.quant import default_dtype

    # auto: bf16 where this machine multiplies bf16 natively, else fp32 (bf16 is emulated, and slower, on AVX2 CPUs)
    dtype = default_dtype("cpu") if args.dtype == "auto" else args.dtype
    model = load_model(args.model, dtype=dtype, quant=args.quant)
    if args.adapter:
        attach_adapters(model, args.adapter, force=args.force)
    tok = resolve_tokenizer(args.tokenizer, args.adapter or [], model.config.vocab_size)
    return model, tok


def _sampling(args: argparse.Namespace) -> dict:
    return {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
            "presence_penalty": args.presence_penalty, "frequency_penalty": args.frequency_penalty,
            "seed": args.seed}


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def add_parser(sub: argparse._SubParsersAction) -> None:
    def common(p, temperature, top_p, max_tokens):
        p.add_argument("--model", required=True, help="base checkpoint (.pth or .safetensors)")
        p.add_argument("--adapter", action="append", metavar="PATH[:W]",
                       help="adapter directory or packed .safetensors, with an optional weight (repeatable)")
        p.add_argument("--tokenizer", help="world or PATH/tokenizer.json (default: the adapter's, else world for a "
                                           "65536-token model)")
        p.add_argument("--max-tokens", type=int, default=max_tokens)
        p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
        p.add_argument("--top-p", type=float, default=top_p)
        p.add_argument("--top-k", type=int, default=0, help="0 = off")
        p.add_argument("--presence-penalty", type=float, default=0.0, help="ChatRWKV alpha_presence")
        p.add_argument("--frequency-penalty", type=float, default=0.0, help="ChatRWKV alpha_frequency")
        p.add_argument("--seed", type=int)
        p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                       help="compute dtype; auto: bf16 where the CPU has native bf16 (AVX-512/AMX), else fp32")
        p.add_argument("--quant", choices=["none", "int8", "nf4"], default="none",
                       help="hold the block projections quantized (int8: ~1/2 of bf16, nf4: ~1/4); needs torchao")
        p.add_argument("--force", action="store_true", help="plug in adapters made for another base")

    p = sub.add_parser("generate", help="generate text (RNN mode), with adapters plugged in",
                       description="Generate a continuation of --prompt, streamed to stdout.")
    common(p, 1.0, 0.85, 200)
    p.add_argument("--prompt", required=True)
    p.add_argument("--stop", nargs="+", default=[], metavar="STR", help="stop strings (not printed)")
    p.set_defaults(func=run_generate)

    p = sub.add_parser("chat", help="chat on stdin lines, keeping the state across turns",
                       description="Each stdin line is a user turn; the state carries over between turns. Formats: "
                                   "raven (Bob:/Alice:) and world (User:/Assistant:).")
    common(p, 1.0, 0.3, 300)
    p.add_argument("--format", choices=sorted(CHAT_FORMATS), help="default: world for the World tokenizer, "
                                                                  "else raven")
    p.set_defaults(func=run_chat)


def run_generate(args: argparse.Namespace) -> int:
    model, tok = load_for_generation(args)
    text = args.prompt.replace("\\n", "\n")
    generate_text(model, tok, text, max_tokens=args.max_tokens, stop=args.stop, on_text=_write, **_sampling(args))
    _write("\n")
    return 0


def run_chat(args: argparse.Namespace) -> int:
    model, tok = load_for_generation(args)
    fmt = args.format or ("world" if tok.name == "world" else "raven")
    user, bot = CHAT_FORMATS[fmt]
    state = None
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        _write(f"{bot}:")
        reply, _, prompt_state = generate_text(
            model, tok, f"{user}: {line}\n\n{bot}:", max_tokens=args.max_tokens, stop=["\n\n", f"\n{user}:"],
            on_text=_write, state=state, **_sampling(args))
        _write("\n\n")
        # the state continues from the prompt with the reply in canonical form: " answer\n\n"
        if prompt_state is None:
            _, prompt_state = model.prefill(tok.encode(f"{user}: {line}\n\n{bot}:"), state)
        _, state = model.prefill(tok.encode(reply.rstrip() + "\n\n"), prompt_state)
    return 0
