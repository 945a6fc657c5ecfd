"""Adapters plugged into a model without merging: `load_model("base.pth", adapters=[...])`.

Each adapted nn.Linear becomes a `LoRALinear` that adds the LoRA delta factored (two thin matmuls, the delta
`finetune.adapter_format.lora_delta` is never formed); tensors trained in full are blended into the weights as a
merge would; a state adapter becomes the model's start state. The state dict keeps the checkpoint's keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn

from finetune import checkpoint
from finetune.adapter_format import blend_full_, check_adapter, lora_factors, read_adapters
from finetune.errors import FinetuneError
from finetune.models import family_for
from finetune.quant import linear as quant_linear, load_model as load_quantized


class LoRALinear(nn.Linear):
    """An nn.Linear plus unmerged LoRA deltas: y = x W^T + sum_i w_i lora_delta(A_i, B_i, s_i) x.

    The adapters' factors are concatenated (A: [sum r, in], B: [out, sum r], with w_i * s_i folded into B by
    `lora_factors`), so any number of adapters costs two thin matmuls. The weight is the original Parameter.
    """

    def __init__(self, base: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.factor_dtype = getattr(base, "compute_dtype", base.weight.dtype)  # a narrow-held weight's model dtype
        self.register_buffer("lora_A", None, persistent=False)
        self.register_buffer("lora_B", None, persistent=False)

    def add(self, A: torch.Tensor, B: torch.Tensor, scaling: float) -> None:
        """Add one adapter's delta, lora_delta(A, B, scaling) (its weight folded into `scaling`)."""
        A, B = lora_factors(A, B, scaling)
        dtype, device = self.factor_dtype, self.weight.device
        A, B = A.to(device=device, dtype=dtype), B.to(device=device, dtype=dtype)
        self.lora_A = A if self.lora_A is None else torch.cat([self.lora_A, A], 0)
        self.lora_B = B if self.lora_B is None else torch.cat([self.lora_B, B], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = quant_linear(x, self.weight, self.bias)  # F.linear, or dequantize-and-multiply for a quantized base
        if self.lora_A is not None:
            y = y + nn.functional.linear(nn.functional.linear(x, self.lora_A), self.lora_B)
        return y


def attach_adapters(model: nn.Module, adapters: Iterable, force: bool = False) -> nn.Module:
    """Plug adapters into a model without merging: `[DIR, (DIR2, 0.5), "FILE.safetensors:0.3"]`.

    Every adapter is checked against the model first (family, target keys, shapes, base fingerprint; see
    `check_adapter`; force=True accepts another base of the same shapes). Returns the model in eval mode.
    """
    read = read_adapters(adapters)
    if not read:
        return model.eval()
    family = family_for(model)
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith(("lora_A", "lora_B"))}
    base_fp = getattr(model, "base_fingerprint", None)
    if base_fp is None:  # built by hand rather than from a checkpoint: its weights as they are now
        base_fp = checkpoint.fingerprint(sd)
        model.base_fingerprint = base_fp
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    state_shapes = {k: tuple(v.shape[1:]) for k, v in model.zero_state(1, "cpu").tensors().items()}
    for a, _ in read:
        check_adapter(a, shapes, base_fp, family=family, force=force, state_shapes=state_shapes)
    states = [(a, w) for a, w in read if a.state is not None]
    if len(states) > 1:
        raise FinetuneError(f"adapters {states[0][0].path} and {states[1][0].path} are both state adapters; a model "
                            f"has one start state")
    if states and states[0][1] != 1.0:
        raise FinetuneError(f"adapter {states[0][0].path}: a state adapter takes no weight (it replaces the start "
                            f"state)")
    with torch.no_grad():
        for a, w in read:
            if a.state is not None:
                model.initial_state = a.state.to(model.emb.weight.device, torch.float32).clone()
                continue
            for key, t in a.full.items():
                p = model.get_parameter(key)
                p.copy_(blend_full_(p.float(), t, w).to(p.dtype))
            for module, (A, B) in a.lora.items():
                parent_name, _, child = module.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                lin = getattr(parent, child)
                if not isinstance(lin, nn.Linear):
                    raise FinetuneError(f"adapter {a.path}: {module} is not a linear layer")
                if not isinstance(lin, LoRALinear):
                    lin = LoRALinear(lin)
                    setattr(parent, child, lin)
                lin.add(A, B, w * a.scaling)
    model.adapters = getattr(model, "adapters", []) + [(str(a.path), w) for a, w in read]
    return model.eval()


def load_model(path: str | Path, adapters: Iterable = (), dtype: torch.dtype | str | None = None,
               device: str | torch.device = "cpu", force: bool = False, quant: str = "none") -> nn.Module:
    """Load a BlinkDL RWKV checkpoint with adapters plugged in unmerged (see `attach_adapters`), in eval mode.

    `adapters`: adapter directories or packed `.safetensors` files, or (path, weight) pairs. `quant` int8 / nf4
    holds the block projections quantized (see `finetune.quant`).
    """
    if quant != "none":
        model = load_quantized(path, dtype=dtype, quant=quant, device=device)
    else:
        model = checkpoint.load_model(path, dtype=dtype, device=device)
    return attach_adapters(model, adapters, force=force) if adapters else model
