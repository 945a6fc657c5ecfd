"""Training configuration: plain dataclasses, one docstring per field, mirrored one-to-one by the YAML recipes.

    config = load_config("recipes/demo.yaml", ["--lora.r", "16", "--max_steps", "50"])

A recipe is a YAML mapping with the keys of `TrainConfig`; the `lora` section holds the keys of `LoRASettings`.
Overrides are `--key value` (or `--key=value`), dotted for sections (`--lora.r 16`), values parsed as YAML scalars
(`--lora.parts [att,ffn]`, `--val_data null`). Any unknown key is a one-line error listing the valid ones.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from finetune.adapters import LORA_INITS
from finetune.errors import FinetuneError
from finetune.models import FULL_GROUP_CHOICES, LORA_PART_CHOICES
from finetune.quant import MODES as QUANT_MODES

PRECISIONS = ("32", "32-true", "bf16-mixed", "16-mixed")
SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "adamw8bit")
LOGGERS = ("csv", "wandb", "none")
METHODS = ("lora", "full")
SAMPLINGS = ("random", "magic_prime")
TRAIN_TYPES = ("window", "infctx", "state")
BASE_QUANTS = QUANT_MODES
STRATEGIES = ("auto", "ddp", "deepspeed_stage_2",
              "deepspeed_stage_2_offload", "deepspeed_stage_3", "deepspeed_stage_3_offload")


@dataclass
class LoRASettings:
    r: int = 8
    """LoRA rank: the inner width of each B @ A update."""
    alpha: float = 16.0
    """LoRA alpha: the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora). Recorded in the adapter."""
    dropout: float = 0.0
    """Dropout on the LoRA input (0 disables it)."""
    parts: list[str] = field(default_factory=lambda: ["att", "ffn"])
    """Which projections get LoRA: `att` (receptance, key, value, output; and gate on RWKV-5/6), `ffn` (key, value;
    and receptance on RWKV-4/5/6)."""
    train: list[str] = field(default_factory=list)
    """Small tensors trained in full next to LoRA: any of `time` (decays, bonus, token-shift mixes), `ln` (layer
    norms), `emb` (embedding), `head` (output matrix). They are saved in the adapter and replace the base's."""
    use_rslora: bool = False
    """Rank-stabilised LoRA: scale by alpha / sqrt(r) instead of alpha / r."""
    init: str = "default"
    """LoRA initialisation: `default` (A random, B zero), `gaussian`, or `pissa`."""


@dataclass
class TrainConfig:
    model: str | None = None
    """Base checkpoint: a BlinkDL RWKV (4, 5.2, 6 or 7) `.pth` or `.safetensors` (required)."""
    data: str | None = None
    """Training data: a binidx prefix, its `.bin`/`.idx`, or the `PREFIX.json` manifest that `rwkv-lora prepare`
    writes (required)."""
    val_data: str | None = None
    """Held-out data (same forms as `data`) for the validation loss; none when null."""
    tokenizer: str | None = None
    """`world` or a tokenizer.json path. When given, it must be the tokenizer the data was prepared with; it is also
    recorded in the adapter (otherwise the data manifest's tokenizer is)."""
    out_dir: str = "out/run"
    """Where adapters (`step-N/`, `final/`), `metrics.csv`, `loss.png` and the resumable `last.ckpt` go."""
    method: str = "lora"
    """`lora` (train LoRA + the `lora.train` groups; saves adapters) or `full` (train every weight; saves full
    checkpoints `step-N/model.pth`, `final/model.pth`)."""
    train_type: str = "window"
    """`window` (each window in one forward pass), `infctx` (long windows run `chunk_len` tokens at a time with the
    RNN state carried and gradients through it; memory flat in ctx_len, same loss), or `state` (state tuning: train
    only the start state of every layer, everything else frozen, no LoRA; saves a `state` adapter)."""
    chunk_len: int = 512
    """Tokens per chunk for train_type infctx (and state, when ctx_len is longer): activations of one chunk are
    alive at a time."""
    max_steps: int = 100
    """Number of optimizer steps."""
    ctx_len: int = 256
    """Tokens per training window."""
    micro_bsz: int = 1
    """Windows per forward pass (per device)."""
    grad_accum: int = 1
    """Forward passes accumulated per optimizer step; the effective batch is micro_bsz * grad_accum * devices *
    num_nodes."""
    lr: float = 1e-4
    """Peak learning rate (reached at the end of warmup)."""
    lr_final: float = 1e-5
    """Learning rate at the last step (cosine and linear schedules)."""
    warmup_steps: int = 0
    """Steps of linear warmup from 0 to `lr`."""
    schedule: str = "cosine"
    """Decay after warmup: `cosine`, `linear` (both from lr to lr_final) or `constant` (stays at lr)."""
    optimizer: str = "adamw"
    """`adamw` (torch's AdamW: two fp32 moments, 8 bytes per trained weight) or `adamw8bit` (bitsandbytes' AdamW8bit,
    the same update with both moments stored 8-bit in blocks of 256, each block with its own scale: 2 bytes per
    trained weight; tensors under 4096 values keep fp32 moments). For big models on small machines: LoRA r=64 on a
    1.5B RWKV-7 holds 0.11 GB of moments instead of 0.45. Needs bitsandbytes (`pip install 'rwkv-lora[quant]'`)."""
    weight_decay: float = 0.0
    """AdamW weight decay, applied to matrices only (LoRA A/B, emb, head), never to decays, mixes or norms."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    """AdamW betas (RWKV-LM's choice)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float | None = 1.0
    """Clip the gradient norm to this (null: no clipping)."""
    precision: str = "bf16-mixed"
    """`32` (fp32), `bf16-mixed` or `16-mixed` (GPUs without bf16 only: V100, T4), passed to Lightning. The frozen
    base is held in fp32 for `32`, else in bf16 (fp16 for 16-mixed); trained tensors are always fp32."""
    base_quant: str = "none"
    """Hold the frozen base's block projections narrower than the compute (QLoRA): `none`, `bf16` (half of fp32 with
    precision 32: for CPUs whose bf16 matmuls are emulated), `int8` (per-row int8, about half of bf16) or `nf4`
    (4-bit NormalFloat, about a quarter), dequantized (widened) on the fly in the forward and backward passes. A
    frozen emb and head stored 16-bit are left in the checkpoint file's memory map and read from it as used (their
    pages released again: no resident copy); LoRA and the tensors trained in full are fp32. int8/nf4 need torchao
    (`pip install 'rwkv-lora[quant]'`); method lora or train_type state on one device."""
    grad_checkpoint: bool = False
    """Recompute each block in the backward pass: far less activation memory, about 30% slower."""
    compile: bool = False
    """Compile each block with torch.compile (TorchInductor), which fuses the elementwise work between the matrix
    products into generated kernels: fewer tensors kept for the backward pass and far fewer operations queued per
    step (what bounds small models on a GPU). The first step waits for the compiler (about a minute on a 2-core CPU,
    seconds once TorchInductor's cache has the graphs; blocks after the first share one graph). RWKV-7 0.1B LoRA on
    this CPU: 0.96-1.10x the speed, 15-18% less peak memory (README, RWKV-7 training table). Needs a C++ compiler
    (CPU) or Triton (CUDA, shipped with torch). Not with `base_quant` int8/nf4 or DeepSpeed strategies."""
    trim_memory: bool = True
    """Hand freed memory back to the operating system as training goes (Linux, glibc): the heap is trimmed before
    each block runs (costs ~0-7% of a big step, up to ~25% of a small one: RWKV-7 0.1B at ctx 256, batch 1, for a
    21% lower peak), and with a `base_quant` base tensors of 1 MB or more also get their own memory mappings (more
    page faults: RWKV-7 0.1B NF4 ran at ~0.6x the speed for half the peak, 1.15 instead of 2.25 GB; README, memory
    table). The C allocator otherwise keeps what was freed, fragmented, and a CPU run's peak grows with every block.
    Ignored where the C library lacks `malloc_trim`."""
    seed: int = 42
    """Seed for LoRA init, dropout and the data windows: the same seed gives the same run."""
    sampling: str = "random"
    """How windows are drawn: `random` (random offsets, RWKV-LM's default) or `magic_prime` (every window once per
    epoch in a scrambled order)."""
    save_every: int = 0
    """Save an adapter to `out_dir/step-N/` and the resumable state every this many steps (0: only at the end)."""
    val_every: int = 0
    """Compute the validation loss every this many steps (0: only at the end; needs val_data)."""
    val_samples: int = 16
    """Windows of val_data used for each validation loss (the same windows every time)."""
    log_every: int = 1
    """Log metrics (loss, tokens/s, lr) every this many optimizer steps."""
    logger: str = "csv"
    """`csv` (`out_dir/metrics.csv`), `wandb` (Weights & Biases, also offline with WANDB_MODE=offline) or `none`."""
    wandb_project: str = "rwkv-lora"
    """Project name for logger: wandb."""
    accelerator: str = "auto"
    """Lightning accelerator: `auto`, `cpu`, `gpu`/`cuda`."""
    devices: Any = 1
    """Lightning devices: a count, a list of ids, or `auto`."""
    strategy: str = "auto"
    """Lightning strategy: `auto`, `ddp`, `deepspeed_stage_2`, `deepspeed_stage_2_offload`,
    `deepspeed_stage_3`, `deepspeed_stage_3_offload` (DeepSpeed: CUDA and `pip install deepspeed` needed)."""
    num_nodes: int = 1
    """Machines in the run (Lightning num_nodes); launch one process per device with torchrun (see docs/scaling.md)."""
    num_workers: int = 0
    """DataLoader worker processes (0: load in the main process; windows are cheap memory-mapped slices)."""
    resume: bool = False
    """Continue the run in out_dir from its `last.ckpt` (optimizer, schedule, step and data position included)."""
    lora: LoRASettings = field(default_factory=LoRASettings)
    """LoRA settings (ignored when method is `full`)."""

    @property
    def deepspeed(self) -> bool:
        """Whether `strategy` is one of DeepSpeed's (its engine then owns the optimizer step and the gradients)."""
        return self.strategy.startswith("deepspeed")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {"lora": LoRASettings}


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its docstring (read from the source, litgpt style); used by `--help`."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def valid_keys() -> list[str]:
    keys = []
    for f in dataclasses.fields(TrainConfig):
        if f.name in SECTIONS:
            keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(SECTIONS[f.name])]
        else:
            keys.append(f.name)
    return keys


def _unknown(key: str, where: str) -> FinetuneError:
    return FinetuneError(f"{where}: unknown config key {key!r}; valid keys: {', '.join(valid_keys())}")


def parse_overrides(args: Sequence[str]) -> tuple[str | None, dict[str, Any]]:
    """`--config PATH --a.b v --c=v` -> (PATH, {"a.b": v, "c": v}) with values parsed as YAML scalars."""
    config_path = None
    out: dict[str, Any] = {}
    args = list(args)
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise FinetuneError(f"command line: expected --key value, got {arg!r}")
        key = arg[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise FinetuneError(f"command line: --{key} needs a value")
            raw = args[i + 1]
            i += 2
        key = key.replace("-", "_")
        if key == "config":
            config_path = raw
            continue
        try:
            out[key] = _yaml_scalar(raw) if raw != "" else None
        except yaml.YAMLError:
            out[key] = raw
    return config_path, out


def _yaml_scalar(raw: str) -> Any:
    value = yaml.safe_load(raw)
    if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string; a number is meant
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _flatten(d: dict[str, Any], where: str) -> dict[str, Any]:
    flat = {}
    for k, v in d.items():
        k = str(k)
        if k in SECTIONS:
            if v is None:
                continue
            if not isinstance(v, dict):
                raise FinetuneError(f"{where}: {k} must be a mapping of {', '.join(f.name for f in dataclasses.fields(SECTIONS[k]))}")
            for k2, v2 in v.items():
                flat[f"{k}.{k2}"] = v2
        else:
            flat[k] = v
    return flat


def build_config(values: dict[str, Any], where: str = "config") -> TrainConfig:
    """Flat {"key" / "section.key": value} -> a checked TrainConfig."""
    cfg = TrainConfig()
    top = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for key, value in values.items():
        if "." in key:
            section, sub = key.split(".", 1)
            if section not in SECTIONS or sub not in {f.name for f in dataclasses.fields(SECTIONS[section])}:
                raise _unknown(key, where)
            setattr(getattr(cfg, section), sub, value)
        elif key in top and key not in SECTIONS:
            setattr(cfg, key, value)
        else:
            raise _unknown(key, where)
    return check_config(cfg)


def load_config(path: str | Path | None = None, overrides: Sequence[str] | dict[str, Any] = ()) -> TrainConfig:
    """Read a recipe (optional) and apply command-line overrides (a list of args or an already parsed dict).
    A `--config` inside the argument list names the recipe too."""
    if isinstance(overrides, dict):
        cfg_from_args, over = None, dict(overrides)
    else:
        cfg_from_args, over = parse_overrides(overrides)
    path = path or cfg_from_args
    values: dict[str, Any] = {}
    where = "command line"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FinetuneError(f"{p}: no such recipe file")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise FinetuneError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise FinetuneError(f"{p}: a recipe must be a YAML mapping of config keys")
        values = _flatten(raw, str(p))
        for k in values:  # report unknown recipe keys against the recipe file
            _check_key(k, str(p))
        where = str(p)
    for k in over:
        _check_key(k, "command line")
    values.update(over)
    return build_config(values, where)


def _check_key(key: str, where: str) -> None:
    if key not in valid_keys():
        raise _unknown(key, where)


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise FinetuneError(msg)


def _require_int(name: str, v: Any, minimum: int) -> None:
    """An int (not a bool, not 1e3) >= minimum."""
    kind = "a positive" if minimum == 1 else "a non-negative"
    _require(isinstance(v, int) and not isinstance(v, bool) and v >= minimum,
             f"{name}: must be {kind} integer, got {v!r}")


def _require_real(name: str, v: Any, minimum: float, inclusive: bool = True, below: float | None = None,
                  null_ok: bool = False) -> float:
    """A finite number (YAML may hand over '1e-4' as a string) >= minimum (> with inclusive=False) and < below;
    returned as a float. NaN and inf never pass: they fail every comparison or the isfinite test."""
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            pass
    low = f">= {minimum:g}" if inclusive else f"> {minimum:g}"
    what = f"a finite number {low}" + (f" and < {below:g}" if below is not None else "") + (" or null" if null_ok else "")
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (v >= minimum if inclusive else v > minimum) and (below is None or v < below)
    _require(ok, f"{name}: must be {what}, got {v!r}")
    return float(v)


def _as_list(name: str, v: Any) -> list:
    """A list from YAML's list, a comma-separated string, or null (empty); anything else is refused by name."""
    if v is None:
        return []
    if isinstance(v, str):
        return [s.strip() for s in v.split(",") if s.strip()]
    _require(isinstance(v, (list, tuple)), f"{name}: must be a list, got {v!r}")
    return list(v)


ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
MAX_STEPS = 10 ** 12  # beyond any real run; keeps steps x batch within the sampler's 64-bit indices


def _check_devices(cfg: "TrainConfig") -> None:
    """accelerator and devices as Lightning takes them, refused here in one line rather than by Lightning's Trainer
    after the model is built: a count >= 1, -1 (every GPU), "auto", or GPU ids (a list, or "0,1")."""
    _require(isinstance(cfg.accelerator, str) and cfg.accelerator in ACCELERATORS,
             f"accelerator: {cfg.accelerator!r} is not one of {', '.join(ACCELERATORS)}")
    d = cfg.devices
    if isinstance(d, str) and d != "auto":
        ids = [x.strip() for x in d.split(",")]
        _require(all(x.isdigit() for x in ids) and ids, f"devices: {d!r} is not a count, GPU ids or auto")
        d = int(ids[0]) if len(ids) == 1 else [int(x) for x in ids]
    ok = (d == "auto" or (isinstance(d, int) and not isinstance(d, bool) and (d >= 1 or d == -1)) or
          (isinstance(d, list) and d and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in d)))
    _require(ok, f"devices: {cfg.devices!r} is not a count (>= 1, or -1 for every GPU), a list of GPU ids or auto")


def check_config(cfg: TrainConfig) -> TrainConfig:
    """Normalise types and reject impossible values, each with a one-line message naming the setting."""
    cfg.precision = str(cfg.precision)
    _require(cfg.precision in PRECISIONS, f"precision: {cfg.precision!r} is not one of {', '.join(PRECISIONS)}")
    if cfg.precision == "32-true":
        cfg.precision = "32"
    for name in ("max_steps", "ctx_len", "micro_bsz", "grad_accum", "chunk_len", "num_nodes", "log_every",
                 "val_samples"):
        _require_int(name, getattr(cfg, name), minimum=1)
    _require(cfg.train_type in TRAIN_TYPES, f"train_type: {cfg.train_type!r} is not one of {', '.join(TRAIN_TYPES)}")
    _require(cfg.strategy in STRATEGIES, f"strategy: {cfg.strategy!r} is not one of {', '.join(STRATEGIES)}")
    _require(not (cfg.train_type == "state" and cfg.method == "full"),
             "train_type: state trains only the start state; it cannot be combined with method: full")
    for name in ("warmup_steps", "save_every", "val_every", "num_workers", "seed"):
        _require_int(name, getattr(cfg, name), minimum=0)
    _require(cfg.seed < 2 ** 63, f"seed: {cfg.seed} is beyond torch's generator (at most 2^63 - 1)")
    _require(cfg.max_steps <= MAX_STEPS, f"max_steps: {cfg.max_steps} is beyond any run (at most {MAX_STEPS:.0e})")
    _check_devices(cfg)
    _require(cfg.schedule in SCHEDULES, f"schedule: {cfg.schedule!r} is not one of {', '.join(SCHEDULES)}")
    # a non-finite rate or epsilon turns every weight into NaN at the first step: refuse it here, not 1000 steps in
    _require(cfg.optimizer in OPTIMIZERS, f"optimizer: {cfg.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    _require(cfg.optimizer == "adamw" or not cfg.deepspeed,
             f"optimizer: {cfg.optimizer} is not for DeepSpeed strategies (DeepSpeed runs its own optimizer); use "
             f"optimizer: adamw")
    cfg.lr = _require_real("lr", cfg.lr, minimum=0.0, inclusive=False)
    cfg.lr_final = _require_real("lr_final", cfg.lr_final, minimum=0.0)
    cfg.weight_decay = _require_real("weight_decay", cfg.weight_decay, minimum=0.0)
    cfg.eps = _require_real("eps", cfg.eps, minimum=0.0, inclusive=False)
    if cfg.grad_clip is not None:
        cfg.grad_clip = _require_real("grad_clip", cfg.grad_clip, minimum=0.0, inclusive=False, null_ok=True)
    betas = _as_list("betas", cfg.betas)
    _require(len(betas) == 2, f"betas: must be two numbers in [0, 1), got {cfg.betas!r}")
    cfg.betas = [_require_real("betas", b, minimum=0.0, below=1.0) for b in betas]
    _require(cfg.logger in LOGGERS, f"logger: {cfg.logger!r} is not one of {', '.join(LOGGERS)}")
    _require(cfg.method in METHODS, f"method: {cfg.method!r} is not one of {', '.join(METHODS)}")
    _require(cfg.sampling in SAMPLINGS, f"sampling: {cfg.sampling!r} is not one of {', '.join(SAMPLINGS)}")
    _require(isinstance(cfg.resume, bool), f"resume: must be true or false, got {cfg.resume!r}")
    _require(isinstance(cfg.grad_checkpoint, bool), "grad_checkpoint: must be true or false")
    _require(isinstance(cfg.trim_memory, bool), "trim_memory: must be true or false")
    _require(isinstance(cfg.compile, bool), "compile: must be true or false")
    cfg.base_quant = "none" if cfg.base_quant in (None, False) else str(cfg.base_quant)
    _require(cfg.base_quant in BASE_QUANTS, f"base_quant: {cfg.base_quant!r} is not one of {', '.join(BASE_QUANTS)}")
    if cfg.base_quant != "none":
        _require(cfg.method == "lora", "base_quant: a quantized base is frozen; method full trains every weight "
                                       "(use base_quant none)")
        _require(cfg.lora.init != "pissa" or cfg.train_type == "state",
                 "base_quant: lora.init pissa rewrites the base weights, which a quantized base cannot hold; use "
                 "lora.init default or base_quant none")
        _require(cfg.strategy == "auto" and cfg.num_nodes == 1 and cfg.devices in (1, [0], "1"),
                 "base_quant: quantized bases are supported on one device (strategy auto, devices 1, num_nodes 1)")
    if cfg.compile:  # combinations the compiled blocks are not tested with
        _require(cfg.base_quant in ("none", "bf16"), f"compile: not with base_quant {cfg.base_quant} (quantized "
                                                     f"projections are not tested compiled); set compile: false")
        _require(not cfg.deepspeed, f"compile: not with strategy {cfg.strategy}; set "
                                                           f"compile: false")
    lo = cfg.lora
    _require_int("lora.r", lo.r, minimum=1)
    lo.alpha = _require_real("lora.alpha", lo.alpha, minimum=0.0, inclusive=False)
    lo.dropout = _require_real("lora.dropout", lo.dropout, minimum=0.0, below=1.0)
    lo.parts = _as_list("lora.parts", lo.parts)
    lo.train = _as_list("lora.train", lo.train)
    parts, groups, inits = ", ".join(LORA_PART_CHOICES), ", ".join(FULL_GROUP_CHOICES), ", ".join(LORA_INITS)
    bad = [p for p in lo.parts if p not in LORA_PART_CHOICES]
    _require(not bad, f"lora.parts: unknown part {bad[0] if bad else ''!r}; choose from {parts}")
    _require(cfg.method == "full" or lo.parts, f"lora.parts: name at least one of {parts}")
    bad = [g for g in lo.train if g not in FULL_GROUP_CHOICES]
    _require(not bad, f"lora.train: unknown group {bad[0] if bad else ''!r}; choose from {groups}")
    _require(isinstance(lo.init, str) and lo.init in LORA_INITS, f"lora.init: {lo.init!r} is not one of {inits}")
    _require(isinstance(lo.use_rslora, bool), "lora.use_rslora: must be true or false")
    for name in ("model", "data", "val_data", "tokenizer"):
        v = getattr(cfg, name)
        _require(v is None or isinstance(v, str), f"{name}: must be a path string, got {v!r}")
    _require(isinstance(cfg.out_dir, (str, Path)) and str(cfg.out_dir).strip() != "",
             f"out_dir: must be a path string, got {cfg.out_dir!r}")
    cfg.out_dir = str(cfg.out_dir)
    return cfg
