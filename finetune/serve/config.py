"""The server's settings: one dataclass, filled by `rwkv-lora serve`'s flags (or by a test / a script)."""

from __future__ import annotations

from dataclasses import dataclass, field

from finetune.models import DTYPE_NAMES

DTYPES = ("auto", *DTYPE_NAMES)  # as `rwkv-lora generate --dtype`


@dataclass
class ServeConfig:
    """What `rwkv-lora serve` runs: one base model, adapters selectable per request, and the server's limits."""

    model: str
    """The base checkpoint (BlinkDL .pth or .safetensors). Its file stem (or "base") names it in `model`."""
    adapters: dict[str, str] = field(default_factory=dict)
    """name -> adapter directory or packed .safetensors, each selectable as `model: NAME`."""
    adapters_dir: str | None = None
    """A directory whose every adapter (directory or packed file) is selectable by its name (file stem or
    directory name); uploads are written here. Rescanned when a name is not found."""
    runs_dir: str | None = None
    """Where training runs started from the web page live (used by the web page; the API only reports it)."""
    tokenizer: str | None = None
    """world or PATH/tokenizer.json for the base and for adapters that record none (default: as `generate`)."""
    dtype: str = "auto"
    """Compute dtype: auto (bf16 where the CPU multiplies it natively, else fp32), fp32, bf16, fp16."""
    device: str = "cpu"
    """Where the model runs: cpu, cuda, cuda:1, ..."""
    quant: str = "none"
    """Hold the base's block projections quantized: none, int8 (~1/2 of bf16) or nf4 (~1/4); needs torchao. For
    fitting a model in memory: on CPUs without int8/bf16 arithmetic it is slower (README, memory table)."""
    pack_weights: bool = True
    """On a CPU with an fp32 base, keep a second copy of each base matrix packed for batched decoding
    (`finetune.ops.rows_matmul`): 8-row decode steps ~2.3x faster, for twice the memory of those weights
    (`PackedLinear`)."""
    host: str = "127.0.0.1"
    """Interface to listen on. Anything but loopback needs `api_key`."""
    port: int = 8000
    """TCP port."""
    api_key: str | None = None
    """When set, every /v1 route needs `Authorization: Bearer <api_key>`."""
    allow_upload: bool = False
    """Accept adapters uploaded with POST /v1/adapters (written into `adapters_dir`)."""
    allow_train: bool = False
    """Let the web page start training runs (in `runs_dir`)."""
    max_tokens: int = 1024
    """Cap on a request's max_tokens (a request asking for more is refused with 400)."""
    default_max_tokens: int = 256
    """max_tokens when a request gives none."""
    max_prompt_tokens: int = 8192
    """Cap on a prompt's length in tokens (the whole rendered conversation for chat)."""
    max_body_bytes: int = 1 << 20
    """Cap on a request body (413 above it), counted as it arrives whatever Content-Length says."""
    max_upload_bytes: int = 256 << 20
    """Cap on an uploaded adapter's body."""
    max_batch: int = 16
    """Streams decoded together in one batch; more requests wait for a free row."""
    max_waiting: int = 64
    """Requests waiting for a row; beyond this the server answers 503."""
    state_cache_bytes: int = 256 << 20
    """Budget of the prompt-state cache (RNN states after prompts and chat turns, least recently used evicted)."""
    force: bool = False
    """Plug in adapters whose recorded base fingerprint differs (only the shapes must fit)."""
