"""One exception type for everything a user can get wrong.

The CLI turns a `FinetuneError` into a single line on stderr and exit status 1 (no traceback): the message must say
which file (or which setting) is wrong and why.
"""


class FinetuneError(Exception):
    """A user-facing error: bad input file, bad config, incompatible adapter, ..."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an exception's message (its type name when the message is empty), for one-line
    errors that wrap a library's exception."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:limit]


class Terminated(BaseException):
    """SIGTERM (from `kill`, `timeout`, a scheduler), raised in the main thread by `raise_terminated` so that the
    command unwinds as on Ctrl-C: every temporary file is removed on the way out. A BaseException, like
    KeyboardInterrupt, so that no `except Exception` on the way swallows it."""


def raise_terminated(signum, frame) -> None:
    """A SIGTERM handler: `signal.signal(signal.SIGTERM, raise_terminated)`."""
    raise Terminated()
