"""Chat templates: how a conversation becomes text, for preparing data (`rwkv-lora prepare --template`), chatting
(`rwkv-lora chat`) and serving (`/v1/chat/completions`). One definition, so a model is prompted exactly as it was
trained. Raven: `Bob: ...\n\nAlice: ...\n\n`; World / G1: `User: ...\n\nAssistant: ...\n\n`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from finetune.errors import FinetuneError
from finetune.tokenizer import Tokenizer

_ESCAPES = {"\\": "\\", "n": "\n", "t": "\t", "r": "\r"}
ESCAPES_HELP = r"\n is a newline, \t a tab, \r a carriage return, \\ a backslash"


def unescape(text: str) -> str:
    """`text` typed on a command line (a prompt, a stop string, a document separator) with the escapes of
    ESCAPES_HELP replaced: a shell cannot easily pass a newline. Any other backslash stays as typed."""
    return re.sub(r"\\([\\ntr])", lambda m: _ESCAPES[m.group(1)], text)


@dataclass(frozen=True)
class ChatTemplate:
    """How an instruction/chat record becomes text. Each format holds `{text}` (or `{question}` / `{answer}`).

    The prompt part of an assistant turn is its format up to `{text}` without trailing whitespace ("Alice:"); the
    learned part is that whitespace, the answer and the rest of the format (" answer\\n\\n"), so the prompt a model
    sees in training is exactly the prompt it is given at inference ("Bob: question\\n\\nAlice:").
    """

    name: str
    user: str
    assistant: str
    system: str = "{text}\n\n"

    def __post_init__(self):
        for key in ("name", "user", "assistant", "system"):
            if not isinstance(getattr(self, key), str):
                raise FinetuneError(f"template: its {key} must be text, got {type(getattr(self, key)).__name__}")
        for key in ("user", "assistant", "system"):
            fmt = getattr(self, key).replace("{question}", "{text}").replace("{answer}", "{text}")
            if fmt.count("{text}") != 1:
                raise FinetuneError(f"template {self.name!r}: the {key} format must contain {{text}} exactly once")
            object.__setattr__(self, key, fmt)

    def assistant_parts(self, answer: str) -> tuple[str, str]:
        """An assistant turn split as training learns it: (the prompt a reply follows, "Alice:"; the learned rest,
        " answer\\n\\n")."""
        before, after = self.assistant.split("{text}")
        prompt = before.rstrip()
        return prompt, before[len(prompt):] + answer + after

    def user_turn(self, text: str) -> str:
        return self.user.replace("{text}", text)

    def system_turn(self, text: str) -> str:
        return self.system.replace("{text}", text)

    def stops(self) -> list[str]:
        """Where a reply ends: a blank line (turns are separated by one) or the user's name on a new line."""
        return ["\n\n", "\n" + self.user.split("{text}")[0].rstrip()]


TEMPLATES = {
    "raven": ChatTemplate("raven", "Bob: {text}\n\n", "Alice: {text}\n\n", "{text}\n\n"),
    "world": ChatTemplate("world", "User: {text}\n\n", "Assistant: {text}\n\n", "System: {text}\n\n"),
}


TEMPLATE_CHOICES = ("auto", *TEMPLATES, "none")  # what --template takes: auto picks by tokenizer, none: plain text


def resolve_template(spec, tokenizer: Tokenizer | None = None) -> ChatTemplate | None:
    """`spec`: "raven", "world", "none", "auto" (world for the World tokenizer, else raven), a ChatTemplate, or a
    dict {"user": ..., "assistant": ..., optional "system", "name"}."""
    if spec is None or isinstance(spec, ChatTemplate):
        return spec
    if isinstance(spec, dict):
        try:
            return ChatTemplate(spec.get("name", "custom"), spec["user"], spec["assistant"],
                                spec.get("system", "{text}\n\n"))
        except KeyError as e:
            raise FinetuneError(f"custom template: missing the {e.args[0]!r} format") from None
    if spec == "none":
        return None
    if spec == "auto":
        return TEMPLATES["world" if tokenizer is not None and tokenizer.name == "world" else "raven"]
    if isinstance(spec, str) and spec in TEMPLATES:
        return TEMPLATES[spec]
    shown = repr(spec)
    raise FinetuneError(f"unknown template {shown[:60]}{'...' if len(shown) > 60 else ''} "
                        f"(choose {', '.join(TEMPLATE_CHOICES)})")


_BLANK_LINES = re.compile(r"\n\s*\n")
USER_ROLES = {"user", "human", "bob"}
ASSISTANT_ROLES = {"assistant", "gpt", "bot", "model", "alice"}


def clean_message(text: str) -> str:
    """A message as one turn: CRLF -> LF, trimmed, blank lines folded (blank lines separate turns in every chat
    format, so none may appear inside a message)."""
    return _BLANK_LINES.sub("\n", text.replace("\r\n", "\n").strip())
