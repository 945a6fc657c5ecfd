"""The names of what a training run keeps in its out_dir, in a module light enough for readers that must not import
Lightning (the web page's run listing in finetune/serve/web.py); run.py and report.py write them."""

from __future__ import annotations

LAST_CKPT = "last.ckpt"  # resumable: trained tensors, optimizer, schedule, loop counters
CONFIG_JSON = "config.json"  # the TrainConfig the run was started with
LOCK_FILE = ".rwkv-lora-train.lock"  # flocked for the life of a run; holds the holder's pid
FINAL = "final"  # the last weights (an adapter directory, or model.pth for method full)
