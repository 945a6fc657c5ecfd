"""What a run reports: out_dir/metrics.csv (written failure-safe, row by row), loss.png, and the summary line."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from finetune.atomic import atomic_file, write_error

METRICS_CSV = "metrics.csv"


class MetricsLog:
    """metrics.csv: one row per logged step, appended as it comes; the file always holds whole rows.

    A failed append (full disk) truncates the file back to its last whole row and raises a one-line error; the
    header is written atomically, so a failure at the start leaves no file at all. On resume the rows up to the
    restored step are kept (later ones are about to be redone)."""

    COLUMNS = ("step", "train_loss", "val_loss", "lr", "tokens_per_s", "tokens")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = 0

    def start(self, keep_until: int | None = None) -> None:
        rows: list[dict[str, str]] = []
        if keep_until is not None and self.path.is_file():
            with open(self.path, newline="", encoding="utf-8") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step") and int(float(r["step"])) <= keep_until]
        text = ",".join(self.COLUMNS) + "\n" + "".join(
            ",".join(r.get(c) or "" for c in self.COLUMNS) + "\n" for r in rows)
        with atomic_file(self.path) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
        self.size = len(text.encode())

    def log(self, step: int, values: dict[str, float]) -> None:
        unknown = set(values) - set(self.COLUMNS)
        if unknown:
            raise ValueError(f"metrics.csv has no column for {sorted(unknown)}")
        # repr: the shortest text that reads back as the same float
        line = ",".join(str(step) if c == "step" else repr(float(values[c])) if c in values else ""
                        for c in self.COLUMNS) + "\n"
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
        except OSError as e:
            try:
                os.truncate(self.path, self.size)  # drop the partial row
            except OSError:
                pass
            raise write_error(self.path, e) from None
        self.size += len(line.encode())


def read_series(metrics_csv: Path, keys: tuple[str, ...]) -> dict[str, dict[int, float]]:
    """{key: {step: value}} for the given columns of a metrics.csv."""
    series: dict[str, dict[int, float]] = {k: {} for k in keys}
    with open(metrics_csv, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            for key in keys:
                if row.get(key) not in (None, "") and row.get("step") not in (None, ""):
                    series[key][int(float(row["step"]))] = float(row[key])
    return series


def plot_losses(metrics_csv: Path, out_png: Path) -> Path | None:
    """Train (and validation) loss against the step, from metrics.csv; matplotlib's Agg backend, no display."""
    if not metrics_csv.is_file():
        return None
    series = read_series(metrics_csv, ("train_loss", "val_loss"))
    if not series["train_loss"]:
        return None
    import matplotlib  # heavy, and only needed here

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        if series[key]:
            xs = sorted(series[key])
            ax.plot(xs, [series[key][x] for x in xs], label=label, marker="o" if key == "val_loss" else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        with atomic_file(out_png) as tmp:
            fig.savefig(tmp, dpi=100, format="png")  # the temporary name has no .png suffix to go by
    finally:
        plt.close(fig)
    return out_png


def summary_line(results: dict[str, Any]) -> str:
    """'done: N steps in Xs; train loss a -> b (mean of k); val loss c -> d'."""
    h = results["losses"]  # steps without a trained token have no loss
    steps = sorted(h)
    done = results.get("steps", len(steps))
    if steps:
        k = max(1, min(10, len(steps) // 5))
        first = sum(h[s] for s in steps[:k]) / k
        last = sum(h[s] for s in steps[-k:]) / k
        line = (f"done: {done} steps in {results['seconds']:.1f}s; train loss {first:.3f} -> {last:.3f} "
                f"(mean of {k})")
    else:
        line = f"done: {done} steps in {results['seconds']:.1f}s"
    if results.get("val_loss") is not None:
        start = results.get("val_loss_start")
        line += f"; val loss {'' if start is None else f'{start:.3f} -> '}{results['val_loss']:.3f}"
    return line
