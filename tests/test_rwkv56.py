"""RWKV-5.2 and RWKV-6 against BlinkDL's own inference code (the `rwkv` pip package, `cpu fp32`, which detects both
versions by itself) and against themselves (parallel vs one-token steps, chunks, checkpointing, casts); the checkpoint
layout, `init --arch 5|6`, `info`, the refusal of v5.0/5.1 and the `time_state` files RWKV-Runner loads."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import write_checkpoint
from finetune import FinetuneError, load_model
from finetune.checkpoint import model_state_dict, read_state_dict
from finetune.cli import main
from finetune.models import FAMILIES, RNNState, detect, detect_version, family_for, rwkv5, rwkv6
from finetune.state_files import state_to_time_state, time_state_to_state
from rwkv56_checkpoints import random_rwkv5_state_dict, random_rwkv6_state_dict

MAKERS = {"5.2": random_rwkv5_state_dict, "6": random_rwkv6_state_dict}

CASES = [
    # (version, n_layer, n_embd, vocab, head_size, storage dtype): 1, 2 and 4 heads, vocabularies that are not powers
    # of two, fp16 and bf16 storage
    ("5.2", 2, 64, 1000, 16, torch.float32),
    ("5.2", 3, 48, 97, 48, torch.float16),
    ("5.2", 2, 64, 301, 32, torch.bfloat16),
    ("6", 2, 64, 1000, 16, torch.float32),
    ("6", 3, 48, 97, 48, torch.float16),
    ("6", 2, 64, 301, 32, torch.bfloat16),
]


def rwkv_package(path):
    from rwkv.model import RWKV as BlinkRWKV

    return BlinkRWKV(str(path), strategy="cpu fp32", verbose=False)


def package_state_to_ours(state: list[torch.Tensor]) -> RNNState:
    """The package's list (att_xx [C], wkv [H, N, N], ffn_xx [C] per layer) as a batch-1 RNNState."""
    n_layer = len(state) // 3
    return RNNState.stack([tuple(state[3 * i + j].unsqueeze(0) for j in range(3)) for i in range(n_layer)])


def tokens_for(vocab: int, n: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"v{c[0]}-{c[1]}x{c[2]}-V{c[3]}-N{c[4]}-{str(c[5])[6:]}")
def test_logits_and_state_match_rwkv_package(tmp_path, case):
    version, n_layer, n_embd, vocab, head_size, dtype = case
    sd = MAKERS[version](n_layer, n_embd, vocab, head_size, seed=7, dtype=dtype)
    ours_path = write_checkpoint(tmp_path / "model.pth", sd)
    # the rwkv package applies ln0 to the embedding in the stored dtype (which rounds): give it an fp32 copy
    ref_path = write_checkpoint(tmp_path / "model-fp32.pth", {k: v.float() for k, v in sd.items()})
    tokens, more = tokens_for(vocab, 40, 3), tokens_for(vocab, 9, 4)

    ref = rwkv_package(ref_path)
    assert ref.version == float(version)  # the package reads it as the version we test
    ref_logits, ref_state = ref.forward(tokens, None, full_output=True)
    ref_state = package_state_to_ours(ref_state)  # (taken before the package continues in place)
    ref_more, _ = ref.forward(more, [s.clone() for s in _as_list(ref_state)], full_output=True)

    model = load_model(ours_path, dtype="fp32")
    assert type(model) is FAMILIES[version].model_class
    with torch.no_grad():
        logits, state = model(torch.tensor([tokens]), return_state=True)
        # continuing from the package's own state: the layouts are the same, not merely our own round trip
        logits_more = model(torch.tensor([more]), ref_state)
    assert logits.shape == (1, len(tokens), vocab)
    torch.testing.assert_close(logits[0], ref_logits.float(), rtol=0, atol=1e-4)
    torch.testing.assert_close(logits_more[0], ref_more.float(), rtol=0, atol=1e-4)
    H, N = n_embd // head_size, head_size
    assert state.wkv.shape == (1, n_layer, H, N, N) and state.wkv.abs().max() > 1  # a state worth comparing
    for field in RNNState.FIELDS:
        torch.testing.assert_close(getattr(state, field), getattr(ref_state, field), rtol=1e-5, atol=1e-4)


def _as_list(state: RNNState) -> list[torch.Tensor]:
    """A batch-1 RNNState as the package's state list."""
    return [t for i in range(state.wkv.shape[1]) for t in (f[0] for f in state.layer(i))]


def small_model(version: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    from finetune.checkpoint import build_from_state_dict

    return build_from_state_dict(MAKERS[version](2, 64, 211, 16, seed=seed, dtype=dtype)).eval()


@pytest.mark.parametrize("version", ["5.2", "6"])
def test_step_equals_parallel_and_chunks_continue(version):
    model = small_model(version, seed=1)
    tokens = torch.randint(0, 211, (2, 25), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole, whole_state = model(tokens, return_state=True)
        first, state = model(tokens[:, :11], return_state=True)
        second, chunk_state = model(tokens[:, 11:], state, return_state=True)
        last, prefill_state = model.prefill(tokens, chunk_len=7)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=0, atol=1e-5)
    torch.testing.assert_close(last, whole[:, -1], rtol=0, atol=1e-5)
    state = None
    for t in range(tokens.shape[1]):
        logits, state = model.step(tokens[:, t], state)
        torch.testing.assert_close(logits, whole[:, t], rtol=0, atol=1e-5)
    for s in (state, chunk_state, prefill_state):
        for field in RNNState.FIELDS:
            torch.testing.assert_close(getattr(s, field), getattr(whole_state, field), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("version", ["5.2", "6"])
def test_gradient_checkpointing_and_state_gradients(version):
    """Checkpointed blocks give the same loss and gradients (weights and the incoming state) as plain ones."""
    model = small_model(version, seed=2).train()
    tokens = torch.randint(0, 211, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, start = model(tokens[:, :5], return_state=True)

    def grads(checkpointing: bool):
        model.zero_grad()
        model.gradient_checkpointing = checkpointing
        state = start.clone().map(lambda t: t.requires_grad_())
        loss = torch.nn.functional.cross_entropy(model(tokens[:, 5:-1], state).flatten(0, 1), tokens[:, 6:].flatten())
        loss.backward()
        return loss, {n: p.grad.clone() for n, p in model.named_parameters()}, state.wkv.grad

    loss0, g0, s0 = grads(False)
    loss1, g1, s1 = grads(True)
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=1e-6)
    assert s0.abs().max() > 0 and all(g.abs().max() > 0 for n, g in g0.items() if n != "emb.weight")
    torch.testing.assert_close(s1, s0, rtol=1e-5, atol=1e-6)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("version", ["5.2", "6"])
def test_low_precision_keeps_the_decay_path_fp32(tmp_path, version):
    sd = MAKERS[version](2, 64, 211, 32, seed=3, dtype=torch.bfloat16)
    path = write_checkpoint(tmp_path / "bf16.pth", sd)
    model = load_model(path)
    att = model.blocks[1].att
    kept = [att.time_decay, att.time_faaaa, att.ln_x.weight]
    if version == "6":
        kept += [att.time_decay_w1, att.time_decay_w2]
        assert att.time_maa_w1.dtype == torch.bfloat16  # the mixes follow the model's dtype
    assert all(p.dtype == torch.float32 for p in kept)
    assert att.key.weight.dtype == torch.bfloat16 and model.head.weight.dtype == torch.bfloat16
    tokens = torch.tensor([tokens_for(211, 20, 5)])
    with torch.no_grad():
        low = model(tokens).float()
        full = load_model(path, dtype="fp32")(tokens)
        model.cast(torch.float16)
        half = model(tokens).float()
    assert model.blocks[1].att.time_faaaa.dtype == torch.float32
    assert (low - full).abs().max() < 0.2 and (half - full).abs().max() < 0.05  # rounding, not a different model
    # saved back in the dtypes it was loaded with: the file's exact tensors
    saved = model_state_dict(load_model(path))
    assert saved.keys() == sd.keys() and all(torch.equal(saved[k], v) for k, v in sd.items())


def test_v50_and_v51_are_refused_by_name_with_the_packages_rule(tmp_path):
    """5.0 (no att.gate) and 5.1 (per-head time_decay) are recognised as the package recognises them, and refused."""
    sd = random_rwkv5_state_dict(2, 64, 100, 16, seed=1)
    v51 = {k: (v[:, 0].contiguous() if k.endswith("att.time_decay") else v) for k, v in sd.items()}
    v50 = {k: v for k, v in v51.items() if ".att.gate." not in k and "time_mix_g" not in k}
    for version, state_dict in (("5.2", sd), ("5.1", v51), ("5.0", v50)):
        path = write_checkpoint(tmp_path / f"v{version}.pth", state_dict)
        assert detect_version(state_dict) == version
        assert rwkv_package(path).version == float(version)
        if version != "5.2":
            with pytest.raises(FinetuneError, match=rf"v{version}\.pth: this is an RWKV-{version} "):
                load_model(path)
    assert detect(sd) is rwkv5.FAMILY and detect(random_rwkv6_state_dict(1, 32, 10, 16)) is rwkv6.FAMILY


@pytest.mark.parametrize("version", ["5.2", "6"])
def test_config_is_read_from_shapes(version):
    sd = MAKERS[version](3, 96, 123, 32, seed=0, dim_ffn=320)
    metas = {k: torch.empty(v.shape, device="meta") for k, v in sd.items()}  # merge reads configs off meta tensors
    family = FAMILIES[version]
    cfg = family.config_from_state_dict(metas)
    assert (cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.n_head, cfg.head_size, cfg.dim_ffn) == (3, 96, 123, 3, 32,
                                                                                                  320)
    if version == "6":
        assert (cfg.d_mix, cfg.d_decay) == (8, 16)
    assert {k: tuple(v.shape) for k, v in sd.items()} == family.expected_shapes(cfg)
    bad = dict(sd, **{"blocks.0.att.time_faaaa": torch.zeros(2, 32)})
    with pytest.raises(FinetuneError, match="time_faaaa is \\[2, 32\\] but the width is 96"):
        family.config_from_state_dict(bad, "x.pth")


@pytest.mark.parametrize("version", ["5.2", "6"])
def test_lora_targets_and_full_groups_name_the_checkpoint(version):
    family = FAMILIES[version]
    model = small_model(version)
    names = dict(model.named_modules())
    for part, targets in family.lora_parts.items():
        for t in targets:
            assert isinstance(names[f"blocks.1.{part}.{t}"], torch.nn.Linear)
    keys = list(model.state_dict())
    groups = {g: [k for k in keys if pred(k)] for g, pred in family.full_groups.items()}
    assert set(groups["time"]) == {k for k in keys if ".time_" in k}
    assert "blocks.1.att.ln_x.weight" in groups["ln"] and "blocks.0.ln0.bias" in groups["ln"]
    assert "ln_out.weight" in groups["ln"] and groups["emb"] == ["emb.weight"] and groups["head"] == ["head.weight"]
    if version == "6":
        assert {"blocks.0.att.time_maa_w1", "blocks.0.att.time_maa_w2", "blocks.0.att.time_decay_w1",
                "blocks.0.ffn.time_maa_k"} <= set(groups["time"])


@pytest.mark.parametrize("arch", ["5", "6"])
def test_init_arch_loads_and_info_describes(tmp_path, capsys, arch):
    out = tmp_path / f"init{arch}.pth"
    assert main(["init", "--arch", arch, "--n-layer", "3", "--n-embd", "64", "--vocab", "300", "--head-size", "32",
                 "--seed", "1", "--dtype", "bf16", "--out", str(out)]) == 0
    sd = read_state_dict(out)
    family = FAMILIES["5.2" if arch == "5" else "6"]
    assert detect(sd, out) is family
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    assert sd["blocks.0.att.time_faaaa"].shape == (2, 32)
    decay = sd["blocks.2.att.time_decay"].float().flatten()
    assert decay[0] == pytest.approx(-6, abs=0.05) and decay[-1] == pytest.approx(-1, abs=0.05)
    assert sd["blocks.1.att.output.weight"].abs().sum() == 0  # blocks start as the identity
    assert sd["blocks.2.att.ln_x.weight"].float().mean() > sd["blocks.0.att.ln_x.weight"].float().mean()
    if arch == "6":
        assert sd["blocks.0.att.time_maa_w1"].abs().sum() == 0 and sd["blocks.0.att.time_maa_w2"].abs().sum() > 0
        assert sd["blocks.0.att.time_maa_w1"].shape == (64, 5 * 32)
    model = load_model(out, dtype="fp32")
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]]))).all()
    r = subprocess.run([sys.executable, "-m", "finetune.cli", "info", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for expected in (family.title, "layers:      3", "heads:       2 x 32", "vocab:       300", "bf16"):
        assert expected in r.stdout
    assert main(["init", "--arch", arch, "--n-layer", "1", "--n-embd", "48", "--vocab", "10",
                 "--out", str(tmp_path / "bad.pth")]) == 1
    assert "--n-embd 48 must be a multiple of --head-size 64" in capsys.readouterr().err
    assert not (tmp_path / "bad.pth").exists()


@pytest.mark.parametrize("version", ["5.2", "6"])
def test_time_state_files_through_rwkv_package(tmp_path, version):
    """A `blocks.N.att.time_state` file (RWKV-Runner / RWKV-PEFT) gives the package and our model the same logits:
    fed to the package as RWKV-Runner's loader does (last two axes transposed for v5/v6 files), and embedded in a
    model file, which the package transposes the same way."""
    n_layer, n_embd, vocab, head_size = 2, 64, 300, 32
    H, N = n_embd // head_size, head_size
    sd = MAKERS[version](n_layer, n_embd, vocab, head_size, seed=4)
    g = torch.Generator().manual_seed(5)
    # a non-symmetric state, so that a missed (or doubled) transpose changes the logits
    time_state = {f"blocks.{i}.att.time_state": torch.randn(H, N, N, generator=g) * 0.5 for i in range(n_layer)}
    state_path = write_checkpoint(tmp_path / "state.pth", time_state)
    tokens = tokens_for(vocab, 12, 6)

    ref = rwkv_package(write_checkpoint(tmp_path / "model.pth", sd))
    runner_state = []  # RWKV-Runner's load_rwkv_state for version < 7
    for i in range(n_layer):
        runner_state += [torch.zeros(n_embd), time_state[f"blocks.{i}.att.time_state"].transpose(1, 2).float(),
                         torch.zeros(n_embd)]
    ref_logits, _ = ref.forward(tokens, runner_state, full_output=True)
    embedded = rwkv_package(write_checkpoint(tmp_path / "tuned.pth", {**sd, **time_state}))
    embedded_logits, _ = embedded.forward(tokens, None, full_output=True)
    plain_logits, _ = ref.forward(tokens, None, full_output=True)
    torch.testing.assert_close(embedded_logits, ref_logits, rtol=0, atol=1e-5)
    assert (plain_logits - ref_logits).abs().max() > 1e-2  # the state matters

    model = load_model(tmp_path / "model.pth", dtype="fp32")
    family = family_for(model)
    state = time_state_to_state(read_state_dict(state_path), family, model.config, state_path)
    assert state.wkv.shape == (n_layer, H, N, N)
    with torch.no_grad():
        logits = model(torch.tensor([tokens]), state.expand(1))
        model.initial_state = state  # as a state adapter: used whenever no state is given
        adapter_logits = model(torch.tensor([tokens]))
        wrong = model(torch.tensor([tokens]), state.map(lambda t: t.transpose(-1, -2) if t.dim() == 4 else t)
                      .expand(1))
    torch.testing.assert_close(logits[0], ref_logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(adapter_logits, logits, rtol=0, atol=0)
    assert (wrong[0] - ref_logits).abs().max() > 1e-2  # the transpose is not a no-op here
    back = state_to_time_state(state.expand(1), family)
    assert back.keys() == time_state.keys() and all(torch.equal(back[k], v) for k, v in time_state.items())

    with pytest.raises(FinetuneError, match="blocks.1.att.time_state has shape"):
        time_state_to_state({**time_state, "blocks.1.att.time_state": torch.zeros(N, H, N)}, family, model.config)
    with pytest.raises(FinetuneError, match="no blocks.1.att.time_state"):
        time_state_to_state({"blocks.0.att.time_state": time_state["blocks.0.att.time_state"]}, family, model.config)
    with pytest.raises(FinetuneError, match="batch of 2"):
        state_to_time_state(state.expand(2), family)

    # the commands: import-state makes a state adapter of the file, export-state writes the very same file back
    adapter, again = tmp_path / "adapter", tmp_path / "again.pth"
    assert main(["import-state", str(state_path), "--base", str(tmp_path / "model.pth"), "--out", str(adapter)]) == 0
    assert main(["export-state", str(adapter), "--out", str(again)]) == 0
    back = read_state_dict(again)
    assert back.keys() == time_state.keys() and all(torch.equal(back[k], v) for k, v in time_state.items())
    with torch.no_grad():
        plugged = load_model(tmp_path / "model.pth", adapters=[adapter], dtype="fp32")(torch.tensor([tokens]))
    torch.testing.assert_close(plugged[0], ref_logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("version", ["5.2", "6"])
def test_peft_lora_on_the_family_targets(version):
    """peft finds every projection of lora_parts by its checkpoint name; the adapter changes the model, one-token
    steps still equal the parallel forward with it plugged in, and merging gives the plugged-in logits."""
    from peft import LoraConfig, get_peft_model

    family = FAMILIES[version]
    model = small_model(version, seed=5)
    tokens = torch.randint(0, 211, (1, 14), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base = model(tokens)
    regex = "^(" + "|".join(rf"blocks\.\d+\.{part}\.({'|'.join(names)})" for part, names in
                            family.lora_parts.items()) + ")$"
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=regex, bias="none"))
    lora_b = {n: p for n, p in peft_model.named_parameters() if "lora_B" in n}
    assert len(lora_b) == 2 * sum(len(v) for v in family.lora_parts.values())  # 2 layers x 8 projections
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in lora_b.values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        plugged = model(tokens)
        state = None
        for t in range(tokens.shape[1]):
            logits, state = model.step(tokens[:, t], state)
            torch.testing.assert_close(logits, plugged[:, t], rtol=0, atol=1e-5)
        merged = peft_model.merge_and_unload()(tokens)
    assert (plugged - base).abs().max() > 1e-2
    torch.testing.assert_close(merged, plugged, rtol=0, atol=1e-4)


def test_state_tuning_v6_exports_a_file_the_package_runs(tmp_path):
    """RWKV-6 state tuning through the trainer (train_type: state): the loss falls, and the exported time_state file,
    fed to the `rwkv` package the way RWKV-Runner loads a v6 file (last two axes transposed), gives the logits of
    the state adapter plugged into our model."""
    import numpy as np

    from finetune.train.config import load_config
    from finetune.train.main import main as train_main
    from test_lora import make_corpus

    n_layer, n_embd, vocab, head_size = 2, 64, 97, 32
    sd = random_rwkv6_state_dict(n_layer, n_embd, vocab, head_size, seed=8)
    base = write_checkpoint(tmp_path / "base.pth", sd)
    data = make_corpus(tmp_path / "train", np.tile(np.random.default_rng(1).integers(1, vocab, 23), 60), vocab=vocab)
    res = train_main(load_config(None, {
        "model": str(base), "data": str(data), "out_dir": str(tmp_path / "run"), "train_type": "state",
        "ctx_len": 24, "micro_bsz": 4, "max_steps": 25, "lr": 0.05, "lr_final": 0.01, "precision": "32", "seed": 3,
        "logger": "none"}), quiet=True)
    losses = [res["losses"][s] for s in sorted(res["losses"])]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
    exported = tmp_path / "state.pth"
    assert main(["export-state", res["final"], "--out", str(exported)]) == 0
    time_state = read_state_dict(exported)
    runner_state = []
    for i in range(n_layer):
        runner_state += [torch.zeros(n_embd), time_state[f"blocks.{i}.att.time_state"].transpose(1, 2).float(),
                         torch.zeros(n_embd)]
    tokens = tokens_for(vocab, 12, 9)
    ref_logits, _ = rwkv_package(base).forward(tokens, runner_state, full_output=True)
    with torch.no_grad():
        ours = load_model(base, adapters=[res["final"]], dtype="fp32")(torch.tensor([tokens]))[0]
        plain = load_model(base, dtype="fp32")(torch.tensor([tokens]))[0]
    torch.testing.assert_close(ours, ref_logits, rtol=0, atol=1e-4)
    assert (plain - ref_logits).abs().max() > 1e-2  # the learned state matters


@pytest.mark.parametrize("version", ["5.2", "6"])
def test_tall_weights_are_column_major_however_loaded(version):
    """head and ffn.key are kept column-major (faster one-token products) whether the model is built as it is, cast
    tensor by tensor or loaded with load_state_dict; its state dict reads the file's values and saves row-major."""
    sd = MAKERS[version](2, 64, 211, 16, seed=0, dtype=torch.float32)
    from finetune.checkpoint import build_from_state_dict

    for model in (build_from_state_dict(sd), build_from_state_dict(sd, dtype=torch.bfloat16)):
        assert model.head.weight.stride() == (1, 211) and model.blocks[1].ffn.key.weight.stride()[0] == 1
        assert model.blocks[1].ffn.value.weight.is_contiguous() and model.blocks[1].att.key.weight.is_contiguous()
    family = detect(sd)
    fresh = family.model_class(family.config_from_state_dict(sd))
    fresh.load_state_dict(sd)
    assert fresh.head.weight.stride() == (1, 211)
    assert all(torch.equal(v, sd[k]) for k, v in fresh.state_dict().items())
    assert all(v.is_contiguous() for v in model_state_dict(fresh).values())


@pytest.mark.parametrize("version", ["5.2", "6"])
def test_merge_to_hf_format_is_refused_in_one_line(tmp_path, version, capsys):
    """transformers has RWKV-4 (RwkvForCausalLM) and, through rwkv7-hf, RWKV-7, but no RWKV-5/6: `merge --format hf`
    wrote an RWKV-4 config around RWKV-5/6 tensors, a directory transformers refused to load. Now one line, nothing
    written; the pth format still merges."""
    import dataclasses

    from finetune.adapters import add_lora, save_adapter
    from finetune.checkpoint import fingerprint

    family = FAMILIES[version]
    sd = MAKERS[version](2, 64, 211, 16, seed=1)
    base = write_checkpoint(tmp_path / "base.pth", sd)
    config = family.config_from_state_dict(sd, base)
    meta = {"family": family.name, "base": {"fingerprint": fingerprint(sd), **dataclasses.asdict(config)},
            "r": 4, "alpha": 8, "dropout": 0.0, "parts": ["att", "ffn"], "train": [], "recipe": {}}
    adapter = save_adapter(add_lora(load_model(base), r=4, alpha=8), tmp_path / "adapter", meta)
    assert main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "hf"),
                 "--format", "hf"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"transformers has no {family.title} architecture" in err, err
    assert not (tmp_path / "hf").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base.pth"]
    assert main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "m.pth")]) == 0
