"""The trainer: `rwkv-lora train` / `python train.py`, LoRA (or full, or state) fine-tuning with PyTorch Lightning.

One module per job; `main.py` reads top to bottom as setup -> main -> fit (the shape of litgpt's finetune scripts):

    config.py       TrainConfig / LoRASettings (the YAML recipes' keys), load_config, validation
    main.py         setup (check every input, build model and data), main (lock, fit, final save, report), fit
    module.py       LitRWKV: the LightningModule (loss, AdamW + schedule, validation loss)
    callbacks.py    RunCallback (metrics, save points, the non-finite guard, stop signals), ProgressBar
    run.py          Run: the run's state and outputs (adapters, last.ckpt, verified-finite saves), out_dir checks,
                    the out_dir lock, resumable-checkpoint checks
    loss.py         masked next-token cross-entropy, chunked (infctx) totals, finiteness checks
    optim.py        AdamW parameter groups (weight decay on matrices only) and the LR schedule
    batches.py      StepBatchSampler: the data position is the optimizer step (exact resume)
    signals.py      SIGTERM / SIGINT: stop at the next step with a resumable last.ckpt (exit 143 / 130)
    report.py       metrics.csv (failure-safe), loss.png, the summary line
    distributed.py  Lightning strategies (DDP, DeepSpeed) and the ZeRO-3 gather before saving
    command.py      the `train` subcommand (light: Lightning is imported only when a run starts)

Importing this package imports nothing heavy; `finetune.train.main` brings in Lightning.
"""
