"""Text generation and chat in RNN mode, with adapters plugged in unmerged (or none).

    rwkv-lora generate --model base.pth [--adapter DIR[:W] ...] --prompt TEXT [--tokenizer world|PATH]
                       [--max-tokens N] [--temperature T] [--top-p P] [--top-k K] [--presence-penalty A]
                       [--frequency-penalty A] [--stop STR ...] [--seed S]
    rwkv-lora chat --model base.pth [--adapter DIR] [--format raven|world] < questions.txt

The prompt is fed in parallel mode in chunks (`model.prefill`), then one token at a time through `model.step`: both
are the model's own forward (a length-1 window takes a fast path inside it), for every RWKV generation; so a prompt
longer than any training ctx_len just works.

Sampling and penalties follow ChatRWKV's `PIPELINE` (the `rwkv` package's rwkv/utils.py), so that its users' numbers
mean the same here:
- temperature 0 = greedy; otherwise probs = softmax(logits); top-p keeps the tokens whose probability is at least
  that of the token where the descending cumulative sum first reaches top_p; top-k then keeps the k most likely;
  then probs ** (1 / temperature), normalised, and a draw. (So top-p and top-k are judged at temperature 1.)
- penalties: logits[t] -= presence + count[t] * frequency for every token t generated so far; after each token
  every count is multiplied by the decay (alpha_decay, 0.996), then the new token's count grows by 1, or by 0 when
  it decodes to a substring of " \t0123456789" (spaces, tabs, digits: such a token still gets the presence
  penalty, never the frequency one).
Generation stops at max tokens, at the end-of-document token 0, or when the text contains a stop string (which is
not printed).
"""

from __future__ import annotations

import argparse
import math
import numbers
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch

from finetune.errors import FinetuneError
from finetune.helpformat import DefaultsHelpFormatter
from finetune.adapter_format import adapter_tokenizer, parse_adapter_spec, read_adapter
from finetune.models import DTYPE_NAMES, RNNState
from finetune.plugin import attach_adapters, load_model
from finetune.quant import MODES as QUANT_MODES, MODES_HELP as QUANT_HELP, default_dtype
from finetune.templates import ESCAPES_HELP, TEMPLATES, resolve_template, unescape
from finetune.tokenizer import Tokenizer, load_tokenizer



# ----------------------------------------------------------------------------------------------------------------------
# Sampling


PENALTY_DECAY = 0.996  # ChatRWKV's alpha_decay
PENALTY_EXEMPT = " \t0123456789"  # a token decoding to a substring of this gets no frequency count (ChatRWKV's rule)


def _finite(x) -> bool:
    return isinstance(x, numbers.Real) and math.isfinite(x)


SEED_RANGE = (-(2 ** 63), 2 ** 64)  # what torch's generator takes: [lo, hi)


def check_sampling(temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, presence_penalty: float = 0.0,
                   frequency_penalty: float = 0.0, penalty_decay: float = PENALTY_DECAY,
                   max_tokens: int = 1, seed: int | None = None) -> None:
    """Refuse, in one line naming the option, a setting that would crash mid-generation or silently mean nothing
    (a NaN temperature, top-p 0, a negative penalty, ...)."""
    if not isinstance(max_tokens, numbers.Integral) or max_tokens < 1:
        raise FinetuneError(f"--max-tokens {max_tokens}: must be a positive number of tokens")
    if not _finite(temperature) or temperature < 0:
        raise FinetuneError(f"--temperature {temperature}: must be a finite number >= 0 (0 = greedy)")
    if not _finite(top_p) or not 0 < top_p <= 1:
        raise FinetuneError(f"--top-p {top_p}: must be in (0, 1] (1 = off)")
    if not isinstance(top_k, numbers.Integral) or top_k < 0:
        raise FinetuneError(f"--top-k {top_k}: must be an integer >= 0 (0 = off)")
    for flag, value in (("--presence-penalty", presence_penalty), ("--frequency-penalty", frequency_penalty)):
        if not _finite(value) or value < 0:
            raise FinetuneError(f"{flag} {value}: must be a finite number >= 0 (0 = off)")
    if not _finite(penalty_decay) or not 0 <= penalty_decay <= 1:
        raise FinetuneError(f"--penalty-decay {penalty_decay}: must be in [0, 1] (1 = no decay)")
    if seed is not None and not (isinstance(seed, numbers.Integral) and SEED_RANGE[0] <= seed < SEED_RANGE[1]):
        raise FinetuneError(f"--seed {seed}: must be an integer from -2^63 to 2^64 - 1")


def sampling_probs(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0,
                   top_k: int = 0) -> torch.Tensor:
    """The distribution ChatRWKV's `PIPELINE.sample_logits` draws from (temperature > 0), as float64 [V].

    top-p and top-k are judged on softmax(logits) at temperature 1; the temperature then reshapes what is left
    (probs ** (1 / T)). Computed in float64 so that a low temperature does not underflow every kept token to 0 (the
    package computes in float32); top-p 1 keeps everything (the package's float32 cumulative sum can stop short of
    1.0 and then keeps only the most likely token)."""
    probs = torch.softmax(logits.float(), dim=-1)
    if top_p < 1:
        sorted_p = torch.sort(probs, descending=True).values
        cum = torch.cumsum(sorted_p, dim=-1)
        first = min(int(torch.searchsorted(cum, torch.tensor([top_p], dtype=cum.dtype))), cum.numel() - 1)
        probs = torch.where(probs < sorted_p[first], torch.zeros_like(probs), probs)
    if 0 < top_k < probs.numel():
        keep = torch.zeros_like(probs, dtype=torch.bool)
        keep[torch.topk(probs, top_k).indices] = True
        probs = torch.where(keep, probs, torch.zeros_like(probs))
    probs = probs.double()
    if temperature != 1.0:
        probs = probs ** (1.0 / temperature)
    return probs / probs.sum()


def sample_logits(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                  generator: torch.Generator | None = None) -> int:
    """One token id from logits [V] (see `sampling_probs`); temperature 0 is greedy."""
    top = float(logits.max())  # NaN when any logit is: one pass (isfinite's was ~3x an argmax), then only for +-inf
    if math.isnan(top) or (math.isinf(top) and not bool(torch.isfinite(logits).any())):
        raise FinetuneError("the model gave NaN (or no finite) logits; is the checkpoint (or an adapter) broken?")
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = sampling_probs(logits, temperature, top_p, top_k)
    if not bool(probs.sum() > 0) or bool(torch.isnan(probs).any()):  # every kept token underflowed: greedy
        return int(torch.argmax(logits))
    return int(torch.multinomial(probs, 1, generator=generator))


class Penalties:
    """ChatRWKV's repetition penalties, as `rwkv.utils.PIPELINE.generate` applies them: every token generated so
    far is penalised by presence + count * frequency; after each new token all counts decay by `decay`, then the
    new token's count grows by 1, or by 0 when it decodes to a substring of " \t0123456789" (so a space or digit
    token gets the presence penalty but never a growing frequency penalty). Without a tokenizer no token is exempt.
    """

    def __init__(self, presence: float = 0.0, frequency: float = 0.0, decay: float = PENALTY_DECAY,
                 tokenizer: Tokenizer | None = None) -> None:
        self.presence = presence
        self.frequency = frequency
        self.decay = decay
        self.tokenizer = tokenizer
        self.counts: dict[int, float] = {}  # token -> decayed count; presence applies to every key
        self._weights: dict[int, float] = {}

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits with the penalties subtracted (a new tensor; `logits` is left as it is)."""
        if not self.counts or not (self.presence or self.frequency):
            return logits
        idx = torch.tensor(list(self.counts), dtype=torch.long)
        # computed in float64 and rounded once, as the package's `out[n] -= presence + count * frequency` does
        pen = self.presence + torch.tensor(list(self.counts.values()), dtype=torch.float64) * self.frequency
        out = logits.clone()
        out[idx] -= pen.to(out.dtype)
        return out

    def weight(self, token: int) -> float:
        if token not in self._weights:
            text = self.tokenizer.decode([token]) if self.tokenizer is not None else None
            self._weights[token] = 0.0 if text is not None and text in PENALTY_EXEMPT else 1.0
        return self._weights[token]

    def update(self, token: int) -> None:
        for t in self.counts:
            self.counts[t] *= self.decay
        self.counts[token] = self.counts.get(token, 0.0) + self.weight(token)


def generate_tokens(model, prompt: Sequence[int], max_tokens: int = 100, temperature: float = 1.0,
                    top_p: float = 1.0, top_k: int = 0, presence_penalty: float = 0.0,
                    frequency_penalty: float = 0.0, seed: int | None = None, state: RNNState | None = None,
                    stop_token: int | None = 0, chunk_len: int = 1024, penalty_decay: float = PENALTY_DECAY,
                    tokenizer: Tokenizer | None = None) -> Iterator[tuple[int, RNNState]]:
    """Yield (token, state the token was sampled from: the prompt and the tokens before it) one at a time.

    The prompt goes through `model.prefill` (parallel mode, chunked); every generated token through `model.step`.
    `tokenizer` only serves the penalties' whitespace/digit exemption (see `Penalties`).
    """
    check_sampling(temperature, top_p, top_k, presence_penalty, frequency_penalty, penalty_decay, max_tokens)
    if len(prompt) == 0:
        raise FinetuneError("the prompt is empty (nothing to condition on)")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    logits, state = model.prefill(torch.as_tensor(list(prompt)), state, chunk_len=chunk_len)
    logits = logits[0].float()
    penalties = Penalties(presence_penalty, frequency_penalty, penalty_decay, tokenizer)
    for _ in range(max_tokens):
        token = sample_logits(penalties.apply(logits), temperature, top_p, top_k, gen)
        if stop_token is not None and token == stop_token:
            return
        yield token, state
        penalties.update(token)
        out, state = model.step([token], state)
        logits = out[0].float()  # penalties subtract in fp32 (as ChatRWKV does), whatever the compute dtype


def check_utf8(text: str, what: str) -> str:
    """`text` itself, or a one-line error when it holds bytes that are not UTF-8: Python hands such command-line
    bytes over as lone surrogates (surrogateescape), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start]
        if "\udc80" <= bad <= "\udcff":  # an escaped byte
            detail = f"byte 0x{ord(bad) - 0xDC00:02x}"
        else:
            detail = f"lone surrogate U+{ord(bad):04X}"
        raise FinetuneError(f"{what} is not valid UTF-8 ({detail} at character {e.start})") from None
    return text


class TextStream:
    """Token ids in, final text out: the one place where generated tokens become streamed text (`generate_text` and
    the server both use it).

    Text is final once it can no longer change: not an incomplete UTF-8 character (the tokenizer decodes a partial
    one to U+FFFD, so it waits for the rest) and not a suffix that could still grow into a stop string (held back).
    When the text contains a stop string, it is cut there and the stream is stopped.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Iterable[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [check_utf8(s, "a stop string") for s in stop if s]
        self.ids: list[int] = []
        self.text = ""
        """The text so far (cut at the stop string once one is hit)."""
        self.emitted = 0
        """How many characters of `text` have been handed out."""
        self.stopped = False
        """True once a stop string was hit."""

    def push(self, token: int) -> str:
        """Add a generated token; returns the text that became final (possibly ""). Check `stopped` after."""
        self.ids.append(token)
        # decoding the whole reply each time keeps multi-token characters right; replies are short
        text = self.tokenizer.decode(self.ids)
        hit = min((text.find(s) for s in self.stop if s in text), default=-1)
        if hit >= 0:
            self.text = text[:hit]
            self.stopped = True
            return self.flush()
        self.text = text
        safe = len(text.rstrip("\ufffd"))  # an incomplete UTF-8 character decodes to U+FFFD: wait for the rest
        hold = 0
        for s in self.stop:  # hold back a suffix that could grow into a stop string
            for n in range(min(len(s) - 1, safe), 0, -1):
                if text[:safe].endswith(s[:n]):
                    hold = max(hold, n)
                    break
        safe -= hold
        if safe <= self.emitted:
            return ""
        out = text[self.emitted:safe]
        self.emitted = safe
        return out

    def flush(self) -> str:
        """The text still held back, at the end of generation."""
        out = self.text[self.emitted:]
        self.emitted = len(self.text)
        return out


def generate_text(model, tokenizer, prompt: str, max_tokens: int = 100, stop: Iterable[str] = (),
                  on_text: Callable[[str], None] | None = None, state: RNNState | None = None,
                  **sampling) -> tuple[str, list[int], RNNState]:
    """Generate from a text prompt. Text is passed to `on_text` as soon as it is final (not the start of a stop
    string, not an incomplete UTF-8 character; see `TextStream`). Returns (text without the stop string, token ids,
    state after the prompt)."""
    stream = TextStream(tokenizer, stop)
    prompt_state = None
    prompt_ids = tokenizer.encode(check_utf8(prompt, "the prompt"))
    for token, st in generate_tokens(model, prompt_ids, max_tokens=max_tokens, state=state, tokenizer=tokenizer,
                                     **sampling):
        if prompt_state is None:
            prompt_state = st
        out = stream.push(token)
        if on_text is not None and out:
            on_text(out)
        if stream.stopped:
            break
    rest = stream.flush()
    if on_text is not None and rest:
        on_text(rest)
    return stream.text, stream.ids, prompt_state


# ----------------------------------------------------------------------------------------------------------------------
# Loading for the CLI


def resolve_tokenizer(arg: str | None, adapters: Sequence, vocab_size: int):
    tok = None
    if arg is None:  # the tokenizer the adapters record (and carry), wherever they were trained
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
        if spec != "world" and (not spec.endswith(".json") or not Path(spec).is_file()):
            raise FinetuneError(f"tokenizer {spec!r} is not 'world' nor a tokenizer.json file here")
        tok = load_tokenizer(spec)
    if tok.vocab_size > vocab_size:
        raise FinetuneError(f"tokenizer {tok.name} has {tok.vocab_size} tokens but the model only {vocab_size}")
    return tok


def load_for_generation(args: argparse.Namespace):
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
            "penalty_decay": args.penalty_decay, "seed": args.seed}


def _check_args(args: argparse.Namespace) -> None:
    """Every setting checked before the model is loaded (which can take a while)."""
    check_sampling(args.temperature, args.top_p, args.top_k, args.presence_penalty, args.frequency_penalty,
                   args.penalty_decay, args.max_tokens, args.seed)


def _stdin_lines() -> Iterator[str]:
    """stdin's lines, decoded one at a time: a line that is not UTF-8 is a one-line error naming it (the lines
    before it have been answered)."""
    for n, raw in enumerate(sys.stdin.buffer, 1):
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise FinetuneError(f"stdin line {n} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte "
                                f"{e.start})") from None


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
        p.add_argument("--max-tokens", type=int, default=max_tokens, help="tokens to generate at most")
        p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
        p.add_argument("--top-p", type=float, default=top_p, help="keep the likeliest tokens up to this probability")
        p.add_argument("--top-k", type=int, default=0, help="0 = off")
        p.add_argument("--presence-penalty", type=float, default=0.0, help="ChatRWKV alpha_presence")
        p.add_argument("--frequency-penalty", type=float, default=0.0, help="ChatRWKV alpha_frequency")
        p.add_argument("--penalty-decay", type=float, default=PENALTY_DECAY,
                       help="ChatRWKV alpha_decay: the counts decay by this much per token")
        p.add_argument("--seed", type=int, help="for reproducible sampling (default: a fresh seed each run)")
        p.add_argument("--dtype", choices=("auto", *DTYPE_NAMES), default="auto",
                       help="compute dtype; auto: bf16 where the CPU has native bf16 (AVX-512/AMX), else fp32")
        p.add_argument("--quant", choices=QUANT_MODES, default="none",
                       help=QUANT_HELP)
        p.add_argument("--force", action="store_true", help="plug in adapters made for another base")

    p = sub.add_parser("generate", help="generate text (RNN mode), with adapters plugged in",
                       description="Generate a continuation of --prompt, streamed to stdout.",
                       formatter_class=DefaultsHelpFormatter)
    common(p, 1.0, 0.85, 200)
    p.add_argument("--prompt", required=True, help=f"the text to continue; {ESCAPES_HELP}")
    p.add_argument("--stop", nargs="+", default=[], metavar="STR",
                   help=f"stop strings (not printed); {ESCAPES_HELP}")
    p.set_defaults(func=run_generate)

    p = sub.add_parser("chat", help="chat on stdin lines, keeping the state across turns",
                       description="Each stdin line is a user turn; the state carries over between turns. Formats: "
                                   "raven (Bob:/Alice:) and world (User:/Assistant:).",
                       formatter_class=DefaultsHelpFormatter)
    common(p, 1.0, 0.3, 300)
    p.add_argument("--format", choices=sorted(TEMPLATES), help="default: the chat format the adapter was trained "
                                                               "in, else world for the World tokenizer, else raven")
    p.set_defaults(func=run_chat)


def run_generate(args: argparse.Namespace) -> int:
    _check_args(args)
    text = unescape(check_utf8(args.prompt, "--prompt"))
    stops = [unescape(check_utf8(stop, "--stop")) for stop in args.stop]
    model, tok = load_for_generation(args)
    generate_text(model, tok, text, max_tokens=args.max_tokens, stop=stops, on_text=_write, **_sampling(args))
    _write("\n")
    return 0


def _chat_template(adapters: Sequence, tok: Tokenizer):
    """The chat format the first adapter that records one was trained in; else by tokenizer (World: User /
    Assistant, others: Raven's Bob / Alice)."""
    for spec in adapters:
        recorded = read_adapter(parse_adapter_spec(spec)[0]).meta.template
        if resolve_template(recorded, tok) is not None:
            return resolve_template(recorded, tok)
    return resolve_template("auto", tok)


def run_chat(args: argparse.Namespace) -> int:
    _check_args(args)
    model, tok = load_for_generation(args)
    template = TEMPLATES[args.format] if args.format else _chat_template(args.adapter or [], tok)
    bot = template.assistant_parts("")[0]  # "Alice:"

    def prompt_of(line: str) -> str:  # "Bob: hi\n\nAlice:"
        return template.user_turn(line) + bot

    turn_end = template.assistant.split("{text}")[1]  # "\n\n"
    state = None
    for line in _stdin_lines():
        line = line.strip()
        if not line:
            continue
        _write(bot)
        reply, _, prompt_state = generate_text(
            model, tok, prompt_of(line), max_tokens=args.max_tokens, stop=template.stops(),
            on_text=_write, state=state, **_sampling(args))
        _write("\n\n")
        # the state continues from the prompt with the reply in canonical form: " answer\n\n"
        if prompt_state is None:
            _, prompt_state = model.prefill(tok.encode(prompt_of(line)), state)
        _, state = model.prefill(tok.encode(reply.rstrip() + turn_end), prompt_state)
    return 0
