"""One exception type for everything a user can get wrong.

The CLI turns a `FinetuneError` into a single line on stderr and exit status 1 (no traceback): the message must say
which file (or which setting) is wrong and why.
"""


class FinetuneError(Exception):
    """A user-facing error: bad input file, bad config, incompatible adapter, ..."""
