"""`rwkv-lora serve`: the OpenAI-compatible server on one base model with adapters selectable per request.

    rwkv-lora serve --model base.pth [--adapter NAME=PATH ...] [--adapters-dir DIR] [--runs-dir DIR]
                    [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--allow-upload] [--allow-train]

Listens on 127.0.0.1 unless told otherwise; any other interface needs --api-key (also read from a file with
--api-key-file, so that it stays out of `ps`).
"""

from __future__ import annotations

import argparse
import ipaddress
from pathlib import Path

from finetune.errors import FinetuneError
from finetune.helpformat import DefaultsHelpFormatter
from finetune.quant import MODES as QUANT_MODES, MODES_HELP as QUANT_HELP
from finetune.serve.config import DTYPES, ServeConfig


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and "localhost" (a name that resolves elsewhere is not trusted to be local)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _adapter_arg(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=PATH")
    return name, path


def add_parser(sub: argparse._SubParsersAction) -> None:
    defaults = ServeConfig(model="")
    p = sub.add_parser("serve", help="serve an OpenAI-compatible API, adapters chosen per request",
                       description="An OpenAI-compatible server (/v1/completions, /v1/chat/completions, /v1/models) "
                                   "on one base model; `model` picks the adapter, and requests for different "
                                   "adapters are decoded together in one batch.",
                       formatter_class=DefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="base checkpoint (.pth or .safetensors)")
    p.add_argument("--adapter", action="append", type=_adapter_arg, default=[], metavar="NAME=PATH",
                   help="serve an adapter (directory or packed .safetensors) as model NAME (repeatable)")
    p.add_argument("--adapters-dir", help="serve every adapter in this directory under its name; uploads go here")
    p.add_argument("--runs-dir", help="training runs directory (for the web page)")
    p.add_argument("--tokenizer", help="world or PATH/tokenizer.json (default: the adapters', else world for a "
                                       "65536-token model)")
    p.add_argument("--dtype", choices=DTYPES, default=defaults.dtype, help="compute dtype")
    p.add_argument("--device", default=defaults.device, help="cpu, cuda or cuda:N")
    p.add_argument("--quant", choices=QUANT_MODES, default=defaults.quant,
                   help=QUANT_HELP)
    p.add_argument("--no-pack", action="store_true",
                   help="no panel-packed second copy of an fp32 base's matrices: half their memory, slower decoding")
    p.add_argument("--host", default=defaults.host,
                   help="interface to listen on (any but 127.0.0.1 needs --api-key)")
    p.add_argument("--port", type=int, default=defaults.port, help="port to listen on")
    p.add_argument("--api-key", help="require Authorization: Bearer KEY on every request")
    p.add_argument("--api-key-file", help="read the key from this file (its first line)")
    p.add_argument("--allow-upload", action="store_true", help="accept adapter uploads (POST /v1/adapters)")
    p.add_argument("--allow-train", action="store_true", help="let the web page start training runs")
    p.add_argument("--max-tokens", type=int, default=defaults.max_tokens, help="cap on a request's max_tokens")
    p.add_argument("--max-prompt-tokens", type=int, default=defaults.max_prompt_tokens,
                   help="cap on a request's prompt")
    p.add_argument("--max-batch", type=int, default=defaults.max_batch, help="streams decoded together")
    p.add_argument("--state-cache-mb", type=float, default=defaults.state_cache_bytes / 2 ** 20,
                   help="prompt-state cache budget in MiB")
    p.add_argument("--force", action="store_true", help="serve adapters made for another base (shapes must fit)")
    p.set_defaults(func=run_serve)


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """The ServeConfig the flags describe; one-line FinetuneError for a setting that cannot work."""
    key = args.api_key
    if args.api_key_file:
        try:
            key = Path(args.api_key_file).read_text().splitlines()[0].strip()
        except (OSError, IndexError) as e:
            raise FinetuneError(f"--api-key-file {args.api_key_file}: cannot read a key ({e})") from None
    if not is_loopback(args.host) and not key:
        raise FinetuneError(f"--host {args.host} exposes the server beyond this machine: give --api-key (or "
                            f"--api-key-file), or keep the default 127.0.0.1")
    names = [n for n, _ in args.adapter]
    if len(set(names)) != len(names):
        raise FinetuneError(f"--adapter: a name is given twice ({', '.join(sorted(names))})")
    for flag, value in (("--max-tokens", args.max_tokens), ("--max-prompt-tokens", args.max_prompt_tokens),
                        ("--max-batch", args.max_batch), ("--port", args.port + 1)):
        if value < 1:
            raise FinetuneError(f"{flag} {value}: must be positive")
    if not 0 <= args.state_cache_mb < 2 ** 40:  # NaN fails this too
        raise FinetuneError(f"--state-cache-mb {args.state_cache_mb}: must be a size in MiB, 0 or more")
    return ServeConfig(model=args.model, adapters=dict(args.adapter), adapters_dir=args.adapters_dir,
                       runs_dir=args.runs_dir, tokenizer=args.tokenizer, dtype=args.dtype, device=args.device,
                       quant=args.quant, pack_weights=not args.no_pack,
                       host=args.host, port=args.port, api_key=key, allow_upload=args.allow_upload,
                       allow_train=args.allow_train, max_tokens=args.max_tokens,
                       default_max_tokens=min(args.max_tokens, ServeConfig.default_max_tokens),
                       max_prompt_tokens=args.max_prompt_tokens, max_batch=args.max_batch,
                       state_cache_bytes=int(args.state_cache_mb * 2 ** 20), force=args.force)


def run_serve(args: argparse.Namespace) -> int:
    # imported here, not at the top: the server's libraries are an optional extra (pip install rwkv-lora[serve]) and
    # `rwkv-lora --help` lists every command without them
    import uvicorn

    from finetune.serve.app import create_app

    config = config_from_args(args)
    app = create_app(config)
    print(f"rwkv-lora serve: http://{config.host}:{config.port}/v1  models: "
          f"{', '.join(app.state.engine.served)}", flush=True)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning")
    return 0
