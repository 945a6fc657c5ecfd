"""The model against BlinkDL's own inference code (the `rwkv` pip package) and against itself (parallel vs RNN)."""

from __future__ import annotations

import pytest
import torch

from conftest import random_rwkv4_state_dict, write_checkpoint
from finetune import load_model
from finetune.checkpoint import read_state_dict, save_checkpoint

SHAPES = [
    # (n_layer, n_embd, vocab): one with n_embd not a multiple of 32 and a vocab that is not a power of two
    (2, 64, 128),
    (3, 80, 1000),
]


def rwkv_package_logits(path, tokens):
    """Logits at every position, and the state, from BlinkDL's own code on an fp32 checkpoint."""
    from rwkv.model import RWKV as BlinkRWKV

    model = BlinkRWKV(str(path), strategy="cpu fp32", verbose=False)
    logits, state = model.forward(list(tokens), None, full_output=True)
    return logits, state


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_logits_match_rwkv_package(tmp_path, shape, dtype):
    n_layer, n_embd, vocab = shape
    sd = random_rwkv4_state_dict(n_layer, n_embd, vocab, seed=7, dtype=dtype)
    ours_path = write_checkpoint(tmp_path / "model.pth", sd)
    # the rwkv package applies ln0 to the embedding in the stored dtype (which rounds): give it an fp32 copy
    ref_path = write_checkpoint(tmp_path / "model-fp32.pth", {k: v.float() for k, v in sd.items()})
    tokens = torch.randint(0, vocab, (40,), generator=torch.Generator().manual_seed(3)).tolist()

    ref_logits, ref_state = rwkv_package_logits(ref_path, tokens)
    model = load_model(ours_path, dtype="fp32")
    with torch.no_grad():
        logits, state = model(torch.tensor([tokens]), return_state=True)
    assert logits.shape == (1, len(tokens), vocab)
    torch.testing.assert_close(logits[0], ref_logits.float(), rtol=0, atol=1e-4)
    # the state after the prompt == the package's list state[5 * l + j]: att shift, a, b, p, ffn shift
    for layer in range(n_layer):
        rows = [state.att_shift[0, layer], *state.wkv[0, layer].unbind(0), state.ffn_shift[0, layer]]
        for j in range(5):
            torch.testing.assert_close(rows[j], ref_state[5 * layer + j].float(), rtol=1e-4, atol=1e-4)


def test_step_equals_parallel(tiny_checkpoint):
    model = load_model(tiny_checkpoint)
    tokens = torch.randint(0, 97, (2, 25), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        parallel = model(tokens)
    state = None
    for t in range(tokens.shape[1]):
        logits, state = model.step(tokens[:, t], state)
        torch.testing.assert_close(logits, parallel[:, t], rtol=0, atol=1e-5)


def test_state_continues_a_sequence(tiny_checkpoint):
    """Two chunks with the state carried equal one window: what prefill and infctx rely on."""
    model = load_model(tiny_checkpoint)
    tokens = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = model(tokens)
        first, state = model(tokens[:, :13], return_state=True)
        second = model(tokens[:, 13:], state)
        last, _ = model.prefill(tokens[0], chunk_len=7)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=0, atol=1e-5)
    torch.testing.assert_close(last, whole[:, -1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_is_tensor_identical(tmp_path, dtype):
    sd = random_rwkv4_state_dict(2, 40, 50, seed=2, dtype=dtype)
    src = write_checkpoint(tmp_path / "in.pth", sd)
    model = load_model(src)
    assert model.blocks[0].att.time_decay.dtype == torch.float32  # decays always fp32
    assert model.blocks[0].att.key.weight.dtype == dtype
    out = save_checkpoint(model, tmp_path / "out.pth")
    back = read_state_dict(out)
    assert list(back) == list(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype and back[k].shape == sd[k].shape, k
        assert torch.equal(back[k], sd[k]), k


def test_config_is_read_from_the_tensors(tmp_path):
    path = write_checkpoint(tmp_path / "m.pth", random_rwkv4_state_dict(3, 56, 321, dim_ffn=200))
    cfg = load_model(path).config
    assert (cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.dim_ffn) == (3, 56, 321, 200)


def test_bf16_model_runs_close_to_fp32(tiny_checkpoint):
    tokens = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = load_model(tiny_checkpoint)(tokens)
        low = load_model(tiny_checkpoint, dtype="bf16")(tokens).float()
    assert torch.isfinite(low).all()
    assert (low - ref).abs().max() < 0.05 * ref.abs().max()


def test_gradient_checkpointing_gives_the_same_gradients(tiny_checkpoint):
    tokens = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(5))
    grads = []
    for ckpt in (False, True):
        model = load_model(tiny_checkpoint).train()
        model.gradient_checkpointing = ckpt
        for p in model.parameters():  # frozen base except one matrix, as under LoRA
            p.requires_grad_(False)
        model.blocks[1].att.key.weight.requires_grad_(True)
        model(tokens).logsumexp(-1).sum().backward()
        grads.append(model.blocks[1].att.key.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
