"""The OpenAI-compatible server: `rwkv-lora serve` (see command.py), the engine that batches adapters per row
(engine.py), the HTTP API (app.py)."""
