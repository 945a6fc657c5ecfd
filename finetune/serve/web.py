"""The web page of `rwkv-lora serve`: its data routes under /api and the page itself at /.

    add_web(app, config)     # called last by create_app: the static page is mounted at / and would hide later routes

/api/config              what the page may show (allow_upload, allow_train, the recipes, whether runs_dir is set)
/api/runs                the training runs under runs_dir: status (running/finished/failed/stopped), step, loss,
                         tokens/s, ETA
/api/runs/{name}         one run's metrics.csv rows as JSON (capped) and its config
POST /api/runs           start a run (allow_train): a recipe from recipes/ by name, `key=value` overrides, a new name
POST /api/runs/{name}/stop   SIGTERM to a run this server started: the trainer saves a resumable last.ckpt and exits

Every /api route takes the server's key (the bearer dependency the OpenAI routes use). The page at / does not: it
is public code (HTML, JS, CSS) holding no data; everything it shows comes through the /api and /v1 routes.

File access stays inside runs_dir: run names are checked against a safe pattern, and every path is resolved (links
followed) and must still lie under runs_dir, so neither `..` nor a symlink leads out. Nothing here writes into
runs_dir: the trainer writes its own out_dir, and its stderr is kept in memory (a file in the run directory would
make the trainer refuse the out_dir as holding foreign files).
"""

from __future__ import annotations

import collections
import csv
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fastapi import APIRouter, Depends, FastAPI, HTTPException
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from finetune.serve.config import ServeConfig
from finetune.train.config import valid_keys
from finetune.train.report import METRICS_CSV, MetricsLog
from finetune.train.layout import CONFIG_JSON, FINAL, LAST_CKPT, LOCK_FILE

STATIC_DIR = Path(__file__).resolve().parent / "static"
# recipes/ beside the package: a checkout (or an editable install) has it; a wheel does not, and then the page
# offers no recipes and POST /api/runs refuses every name
PACKAGE_PARENT = Path(__file__).resolve().parents[2]  # the directory holding the finetune package
RECIPES_DIR = PACKAGE_PARENT / "recipes"

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # one path component, never '.', '..' or hidden
MAX_RUNS = 200  # runs listed (the most recently modified first)
MAX_ROWS = 2000  # metrics rows returned for one run (evenly thinned beyond this, validation rows all kept)
MAX_METRICS_BYTES = 16 << 20  # the tail of metrics.csv read at most (a week-long run's file stays cheap to serve)
MAX_CONFIG_BYTES = 1 << 20  # config.json read at most
MAX_ACTIVE_RUNS = 2  # training runs this server runs at once
STDERR_LINES = 40  # the trainer's last stderr lines kept in memory per run
# overrides the page may not set: out_dir is the run's directory under runs_dir (set by the server, never a path
# from the request), resume would need an existing run directory, which a new run refuses
FIXED_KEYS = ("out_dir", "resume")
STOPPED_STATUSES = (128 + signal.SIGTERM, 128 + signal.SIGINT, -signal.SIGTERM, -signal.SIGINT)


# ---- paths ----------------------------------------------------------------------------------------------------------


def inside(root: Path, *parts: str) -> Path:
    """root/parts with every link resolved; a 404 unless the result is still under root (no `..`, no absolute
    part, no symlink escape). The message names the path as asked, never where a link points."""
    base = root.resolve()
    path = base.joinpath(*parts).resolve()
    if not path.is_relative_to(base) or path == base:
        raise HTTPException(404, f"{'/'.join(parts)}: not inside the runs directory")
    return path


def run_file(run_dir: Path, name: str) -> Path | None:
    """A file of a run, or None when it is a link leading out of runs_dir (then the run shows without it)."""
    try:
        return inside(run_dir, name)
    except HTTPException:
        return None


def check_run_name(name: str) -> str:
    if not RUN_NAME.fullmatch(name):
        raise HTTPException(400, f"{name[:80]!r}: a run name is 1-64 letters, digits, '.', '_' or '-', starting with "
                                 f"a letter or digit")
    return name


def list_recipes() -> list[dict[str, str]]:
    """The recipes the page may start: recipes/*.yaml by name (strategies/ holds Lightning strategy fragments, not
    recipes), each with its first comment line as the description."""
    if not RECIPES_DIR.is_dir():
        return []
    out = []
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        first = path.read_text(encoding="utf-8", errors="replace").split("\n", 1)[0]
        out.append({"name": path.stem, "about": first.lstrip("# ").strip() if first.startswith("#") else ""})
    return out


# ---- what a run directory says ----------------------------------------------------------------------------------------


def _number(text: str | None) -> float | None:
    if text in (None, ""):
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def read_metrics(path: Path | None) -> list[dict[str, float | None]]:
    """metrics.csv as rows of numbers (None where a column is empty), the file's last MAX_METRICS_BYTES at most.
    A row being appended right now may be cut: a row without a step is skipped."""
    if path is None or not path.is_file():
        return []
    with open(path, "rb") as f:
        header = f.readline()
        f.seek(0, os.SEEK_END)
        size = f.tell()
        start = max(len(header), size - MAX_METRICS_BYTES)
        f.seek(start)
        body = f.read()
    if start > len(header):
        body = body.split(b"\n", 1)[-1]  # from the first whole row
    text = (header + body).decode("utf-8", errors="replace")
    rows = []
    reader = csv.DictReader(io.StringIO(text))
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error:  # a damaged line (an overlong field, a NUL): skip it, show the rest
            continue
        step = _number(row.get("step"))
        if step is None:
            continue
        rows.append({c: (int(step) if c == "step" else _number(row.get(c))) for c in MetricsLog.COLUMNS})
    return rows


def thin(rows: list[dict[str, Any]], cap: int) -> list[dict[str, Any]]:
    """At most about `cap` rows for a chart: evenly spaced training rows, the last row, and every validation row."""
    if len(rows) <= cap:
        return rows
    every = math.ceil(len(rows) / cap)
    return [r for i, r in enumerate(rows) if i % every == 0 or i == len(rows) - 1 or r.get("val_loss") is not None]


def read_config(path: Path | None) -> dict[str, Any]:
    """The run's config.json (what the trainer ran with), or {} when absent, too large or damaged."""
    try:
        if path is None or not path.is_file() or path.stat().st_size > MAX_CONFIG_BYTES:
            return {}
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def lock_held(run_dir: Path) -> bool:
    """Whether a run started elsewhere (the command line) is running: the trainer holds an flock on its lock file
    for the life of the run. Read from /proc/locks rather than probed: taking the lock even for an instant could make
    that very run's start fail. Where /proc/locks does not exist, the pid the lock file names must be alive (a pid
    reused after a crash then shows a dead run as running)."""
    path = run_file(run_dir, LOCK_FILE)
    try:
        if path is None or not path.is_file():
            return False
        st = path.stat()
        try:
            table = Path("/proc/locks").read_text()
        except FileNotFoundError:
            return pid_alive(path.read_text()[:32].strip())
    except OSError:
        return False
    # lines like "3: FLOCK  ADVISORY  WRITE 4242 fd:01:1234567 0 EOF" (device major:minor in hex, then the inode)
    me = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    return any(f[1] == "FLOCK" and me in f for f in (line.split() for line in table.splitlines()) if len(f) > 5)


def updated(path: Path | None) -> float | None:
    try:
        return path.stat().st_mtime if path is not None else None
    except OSError:
        return None


def pid_alive(text: str) -> bool:
    if not text.isdigit():
        return False
    try:
        os.kill(int(text), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, someone else's
    return True


# ---- runs this server started ----------------------------------------------------------------------------------------


@dataclass
class Started:
    """A training subprocess this server started, with the last lines of its stderr (read by a thread)."""

    proc: subprocess.Popen
    stderr: collections.deque = field(default_factory=lambda: collections.deque(maxlen=STDERR_LINES))
    reader: threading.Thread | None = None

    def start_reading(self, name: str) -> None:
        self.reader = threading.Thread(target=self._read, name=f"train-{name}-stderr", daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:  # text mode: tqdm's '\r' redraws end lines too
            if line.strip():
                self.stderr.append(line.strip()[:500])
        self.proc.wait()  # reap it now rather than at the next listing

    def last_line(self) -> str | None:
        """The trainer's last stderr line (its one-line error, or where a stopped run saved its state)."""
        if self.reader is not None:
            self.reader.join(timeout=2)  # the process has ended: let the reader take in its last lines
        return self.stderr[-1] if self.stderr else None


class Runs:
    """The runs under runs_dir, and the training subprocesses this server started there."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.started: dict[str, Started] = {}
        self.lock = threading.Lock()

    @property
    def root(self) -> Path:
        if self.config.runs_dir is None:
            raise HTTPException(404, "runs: the server was started without a runs directory (--runs-dir)")
        return Path(self.config.runs_dir)

    def status(self, name: str, run_dir: Path) -> tuple[str, str | None]:
        """(running | finished | failed | stopped, the trainer's last stderr line when this server ran it)."""
        ours = self.started.get(name)
        if ours is not None:
            code = ours.proc.poll()
            if code is None:
                return "running", None
            if code == 0:
                return "finished", None
            return ("stopped" if code in STOPPED_STATUSES else "failed"), ours.last_line()
        if lock_held(run_dir):
            return "running", None
        if (run_dir / FINAL).exists():
            return "finished", None
        if (run_dir / LAST_CKPT).exists():
            return "stopped", None  # resumable: `--resume true` continues it
        return "failed", None  # ended before its first save point

    def summary(self, name: str, run_dir: Path) -> dict[str, Any]:
        status, error = self.status(name, run_dir)
        metrics = run_file(run_dir, METRICS_CSV)
        rows = read_metrics(metrics)
        cfg = read_config(run_file(run_dir, CONFIG_JSON))
        train = [r for r in rows if r["train_loss"] is not None]
        vals = [r for r in rows if r["val_loss"] is not None]
        last = train[-1] if train else None
        max_steps = cfg.get("max_steps") if isinstance(cfg.get("max_steps"), int) else None
        eta = None
        if status == "running" and last and last["tokens_per_s"] and last["tokens"] and last["step"]:
            per_step = last["tokens"] / last["step"] / last["tokens_per_s"]  # seconds per optimizer step
            eta = max(0.0, (max_steps - last["step"]) * per_step) if max_steps else None
        return {"name": name, "status": status, "error": error, "step": last["step"] if last else 0,
                "max_steps": max_steps, "train_loss": last["train_loss"] if last else None,
                "val_loss": vals[-1]["val_loss"] if vals else None,
                "tokens_per_s": last["tokens_per_s"] if last else None, "eta_s": eta,
                "updated": updated(metrics if rows else run_dir),
                "stoppable": name in self.started and status == "running"}

    def list(self) -> list[dict[str, Any]]:
        root = self.root
        found = []
        for entry in (root.iterdir() if root.is_dir() else ()):
            if not RUN_NAME.fullmatch(entry.name) or entry.name in self.started:
                continue
            try:
                run_dir = inside(root, entry.name)  # a symlink out of runs_dir is not listed
            except HTTPException:
                continue
            if run_dir.is_dir() and (run_dir / CONFIG_JSON).is_file():
                found.append((run_dir.stat().st_mtime, entry.name, run_dir))
        # runs started here, first: listed from the start, before the trainer (seconds to import) makes its directory
        found.sort(reverse=True)
        found[:0] = [(0.0, name, root / name) for name in reversed(list(self.started))]
        return [self.summary(name, run_dir) for _, name, run_dir in found[:MAX_RUNS]]

    def get(self, name: str) -> dict[str, Any]:
        run_dir = inside(self.root, check_run_name(name))
        if not run_dir.is_dir() and name not in self.started:  # a run that failed at once may have made nothing
            raise HTTPException(404, f"{name}: no such run")
        rows = read_metrics(run_file(run_dir, METRICS_CSV))
        return {**self.summary(name, run_dir), "rows": thin(rows, MAX_ROWS), "row_count": len(rows),
                "config": read_config(run_file(run_dir, CONFIG_JSON))}

    def start(self, name: str, recipe: str, overrides: list[str]) -> dict[str, Any]:
        check_run_name(name)
        recipes = {r["name"] for r in list_recipes()}
        if recipe not in recipes:
            raise HTTPException(400, f"{recipe[:80]!r}: not a recipe in recipes/ (choose from "
                                     f"{', '.join(sorted(recipes)) or 'none'})")
        args = [override_arg(line) for line in overrides if line.strip()]
        root = self.root
        run_dir = root / name
        with self.lock:
            running = [n for n, s in self.started.items() if s.proc.poll() is None]
            if len(running) >= MAX_ACTIVE_RUNS:
                raise HTTPException(409, f"runs: {len(running)} runs are training already ({', '.join(running)}); "
                                         f"stop one or wait")
            if os.path.lexists(run_dir):
                raise HTTPException(409, f"{name}: a run of that name exists already; choose another name")
            root.mkdir(parents=True, exist_ok=True)
            inside(root, name)  # runs_dir itself may be a link; the run's directory must stay under it
            # `python -m finetune.cli train` is `python train.py` without needing train.py on disk; the package's
            # own parent goes first on PYTHONPATH so that the run uses the code this server runs
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(
                p for p in (str(PACKAGE_PARENT), os.environ.get("PYTHONPATH")) if p))
            cmd = [sys.executable, "-m", "finetune.cli", "train", "--config", str(RECIPES_DIR / f"{recipe}.yaml"),
                   f"--out_dir={run_dir}", *args]
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True, errors="replace", env=env)
            started = Started(proc)
            started.start_reading(name)
            self.started[name] = started
        return {"name": name, "status": "running", "pid": proc.pid}

    def stop(self, name: str) -> dict[str, Any]:
        check_run_name(name)
        ours = self.started.get(name)
        if ours is None:
            raise HTTPException(409, f"{name}: not a run this server started; stop it where it runs (SIGTERM saves "
                                     f"a resumable last.ckpt)")
        if ours.proc.poll() is None:
            ours.proc.send_signal(signal.SIGTERM)  # the trainer saves last.ckpt at the next step and exits 143
        return {"name": name, "status": "stopping" if ours.proc.poll() is None else self.status(name, self.root)[0]}


def override_arg(line: str) -> str:
    """`key=value` (a dotted key for the lora section) -> `--key=value` for the trainer, which parses the value as
    YAML. The key must be a config key; the value stays one argument whatever it holds."""
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from JSON's \ud800: not text a trainer argument can carry
        raise HTTPException(400, f"{line.strip()[:80]!r}: not valid text (a lone surrogate)") from None
    key, sep, value = line.strip().partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key:
        raise HTTPException(400, f"{line.strip()[:80]!r}: an override is key=value (e.g. max_steps=50)")
    if key in FIXED_KEYS:
        raise HTTPException(400, f"{key}: set by the server for a run started here; it cannot be overridden")
    if key not in valid_keys():
        raise HTTPException(400, f"{key[:80]!r}: not a config key; valid keys: {', '.join(valid_keys())}")
    return f"--{key}={value.strip()}"


# ---- the routes -----------------------------------------------------------------------------------------------------


class StartRun(BaseModel):
    name: str = Field(max_length=64)
    recipe: str = Field(max_length=100)
    overrides: list[str] = Field(default_factory=list, max_length=64)


def add_web(app: FastAPI, config: ServeConfig, require_key: Callable[..., Any]) -> None:
    """Mount the page's /api routes (behind `require_key`, the server's bearer-key dependency) and the page at /.
    Call it after every other route: the page's mount at / answers whatever no route before it took.
    `require_key` is passed in rather than imported: app.py defines it and imports this module (no cycle)."""
    runs = Runs(config)
    app.state.web_runs = runs
    router = APIRouter(prefix="/api", dependencies=[Depends(require_key)])

    def need_train() -> None:
        if not config.allow_train:
            raise HTTPException(403, "training: not allowed on this server (start it with --allow-train)")

    @router.get("/config")
    def get_config() -> dict[str, Any]:
        return {"allow_upload": bool(config.allow_upload), "allow_train": bool(config.allow_train),
                "runs": config.runs_dir is not None,
                "recipes": list_recipes() if config.allow_train else []}

    @router.get("/runs")
    def get_runs() -> list[dict[str, Any]]:
        return runs.list()

    @router.get("/runs/{name}")
    def get_run(name: str) -> dict[str, Any]:
        return runs.get(name)

    @router.post("/runs", dependencies=[Depends(need_train)])
    def post_run(body: StartRun) -> dict[str, Any]:
        for line in body.overrides:
            if len(line) > 500:
                raise HTTPException(400, "overrides: a line is longer than 500 characters")
        return runs.start(body.name, body.recipe, body.overrides)

    @router.post("/runs/{name}/stop", dependencies=[Depends(need_train)])
    def stop_run(name: str) -> dict[str, Any]:
        return runs.stop(name)

    app.include_router(router)
    app.mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="web")
