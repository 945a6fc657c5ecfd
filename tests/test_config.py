"""finetune.train.config: recipes, dotted overrides, YAML scalars, unknown keys."""

from pathlib import Path

import pytest

from finetune.train.config import LoRASettings, TrainConfig, load_config, parse_overrides, valid_keys
from finetune.errors import FinetuneError

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))


def test_defaults_and_overrides():
    cfg = load_config(None, ["--model", "m.pth", "--data", "d", "--lora.r", "16", "--lr=3e-4", "--precision", "32",
                             "--lora.parts", "[att]", "--lora.train", "[time, ln]", "--val_data", "null",
                             "--grad_checkpoint", "true"])
    assert isinstance(cfg, TrainConfig) and isinstance(cfg.lora, LoRASettings)
    assert cfg.lora.r == 16 and cfg.lr == 3e-4 and cfg.precision == "32"
    assert cfg.lora.parts == ["att"] and cfg.lora.train == ["time", "ln"]
    assert cfg.val_data is None and cfg.grad_checkpoint is True
    assert cfg.lora.alpha == 16.0  # untouched default


def test_recipe_then_command_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: a.pth\ndata: d\nmax_steps: 7\nlora:\n  r: 4\n  alpha: 8\n")
    cfg = load_config(recipe, ["--max_steps", "9", "--lora.alpha", "2"])
    assert (cfg.model, cfg.max_steps, cfg.lora.r, cfg.lora.alpha) == ("a.pth", 9, 4, 2.0)
    cfg = load_config(None, ["--config", str(recipe)])
    assert cfg.max_steps == 7
    assert cfg.to_dict()["lora"]["r"] == 4


def test_unknown_keys_list_the_valid_ones(tmp_path):
    with pytest.raises(FinetuneError, match=r"unknown config key 'lora.rank'.*lora\.r"):
        load_config(None, ["--lora.rank", "4"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("modle: a.pth\n")
    with pytest.raises(FinetuneError, match=r"r\.yaml: unknown config key 'modle'; valid keys: model"):
        load_config(recipe)
    assert "lora.use_rslora" in valid_keys() and "max_steps" in valid_keys()


@pytest.mark.parametrize("args, msg", [
    (["--precision", "8"], "precision"),
    (["--max_steps", "0"], "max_steps"),
    (["--schedule", "step"], "schedule"),
    (["--lora.parts", "[attn]"], "lora.parts"),
    (["--lora.train", "[bias]"], "lora.train"),
    (["--logger", "tensorboard"], "logger"),
    (["--optimizer", "sgd"], "optimizer: 'sgd' is not one of adamw, adamw8bit"),
    (["--optimizer", "adamw8bit", "--strategy", "deepspeed_stage_2"], "optimizer: adamw8bit is not for DeepSpeed"),
    (["--lr"], "--lr needs a value"),
    # non-finite or nonsensical numbers fail here, not as NaN weights later
    (["--lr", "inf"], r"lr: must be a finite number > 0, got inf"),
    (["--lr", "nan"], r"lr: must be a finite number > 0, got nan"),
    (["--lr", "1e309"], r"lr: must be a finite number > 0, got inf"),
    (["--lr", "0"], r"lr: must be a finite number > 0, got 0"),
    (["--lr_final", "-1e-5"], r"lr_final: must be a finite number >= 0"),
    (["--lr_final", ".inf"], r"lr_final: must be a finite number >= 0, got inf"),
    (["--eps", "0"], r"eps: must be a finite number > 0"),
    (["--weight_decay", "nan"], r"weight_decay: must be a finite number >= 0, got nan"),
    (["--grad_clip", "inf"], r"grad_clip: must be a finite number > 0 or null, got inf"),
    (["--grad_clip", "0"], r"grad_clip: must be a finite number > 0 or null"),
    (["--betas", "[0.9, .nan]"], r"betas: must be a finite number >= 0 and < 1, got nan"),
    (["--betas", "[0.9, 1.0]"], r"betas: must be a finite number >= 0 and < 1, got 1.0"),
    (["--lora.alpha", "inf"], r"lora.alpha: must be a finite number > 0, got inf"),
    (["--lora.dropout", "nan"], r"lora.dropout: must be a finite number >= 0 and < 1"),
    (["--log_every", "true"], r"log_every: must be a positive integer, got True"),
    (["--val_samples", "0"], r"val_samples: must be a positive integer, got 0"),
    (["--max_steps", "1e3"], r"max_steps: must be a positive integer, got 1000.0"),
    (["model"], "expected --key value"),
    (["--compile", "yes please"], "compile: must be true or false"),
    (["--compile", "true", "--base_quant", "nf4"], "compile: not with base_quant nf4"),
    (["--compile", "true", "--strategy", "deepspeed_stage_2"], "compile: not with strategy deepspeed_stage_2"),
    # a scalar where a list belongs, a list where a word does: one line, not a TypeError
    (["--betas", "0.9"], r"betas: must be a list, got 0.9"),
    (["--lora.parts", "5"], r"lora.parts: must be a list, got 5"),
    (["--lora.train", "true"], r"lora.train: must be a list, got True"),
    (["--lora.init", "[x]"], r"lora.init: \['x'\] is not one of"),
    (["--seed", "100000000000000000000"], r"seed: 100000000000000000000 is beyond torch's generator"),
    (["--max_steps", "10000000000000000000"], r"max_steps: 10000000000000000000 is beyond any run"),
    (["--devices", "0"], r"devices: 0 is not a count"),
    (["--devices", "1.5"], r"devices: 1.5 is not a count"),
    (["--devices", "[-2]"], r"devices: \[-2\] is not a count"),
    (["--devices", "two"], r"devices: 'two' is not a count"),
    (["--accelerator", "nope"], r"accelerator: 'nope' is not one of auto, cpu, gpu, cuda"),
    (["--out_dir", "null"], r"out_dir: must be a path string, got None"),
    (["--out_dir", "[a]"], r"out_dir: must be a path string, got \['a'\]"),
    (["--out_dir", "''"], r"out_dir: must be a path string, got ''"),
])
def test_bad_values(args, msg):
    with pytest.raises(FinetuneError, match=msg):
        load_config(None, args)


def test_parse_overrides_yaml_scalars():
    path, over = parse_overrides(["--config", "x.yaml", "--a", "1", "--b", "off", "--c", "1e-4", "--d", "[1, 2]"])
    assert path == "x.yaml" and over == {"a": 1, "b": False, "c": 1e-4, "d": [1, 2]}


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_every_recipe_parses(recipe):
    text = recipe.read_text()
    header = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    assert any(f"--config recipes/{recipe.name}" in h for h in header), "the opening comment shows how to launch"
    body = [ln for ln in text.splitlines()[len(header):] if ln.strip() and not ln.strip().startswith("#")]
    assert all("#" in ln for ln in body), "every knob has a comment"
    cfg = load_config(recipe)
    assert cfg.model and cfg.data


def test_recipes_exist():
    names = {r.name for r in RECIPES}
    assert {"demo.yaml", "demo-pretrain.yaml", "novel.yaml", "raven-instruct.yaml", "world-instruct.yaml"} <= names


@pytest.mark.parametrize("devices", ["1", "auto", "-1", "[0, 1]", "0,1", "2"])
def test_device_settings_lightning_takes(devices):
    assert load_config(None, ["--devices", devices]).devices is not None
