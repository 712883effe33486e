"""LoRA as PEFT wraps a causal LM, reproduced without ``peft``: the same module names and the same math.

SALMONN (``bytedance/SALMONN`` ``models/salmonn.py``) calls ``peft.get_peft_model(LlamaForCausalLM, LoraConfig(r=8,
lora_alpha=32, lora_dropout=0.1))`` with peft 0.3.0, whose Llama default targets are ``q_proj`` and ``v_proj``. The
wrapped LM's parameters are then named ``base_model.model.<lm names>``, each target keeps its ``weight`` and gains
``lora_A.default.weight`` (r x in) and ``lora_B.default.weight`` (out x r), and its output is
``x W^T + b + B(A(dropout(x))) * lora_alpha / r`` (peft 0.3.0 ``tuners/lora.py`` ``Linear.forward``). Writing the few
lines here keeps ``peft`` (whose module paths moved to ``base_layer`` in later versions) out of the dependencies.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

ADAPTER = "default"


class LoraLinear(nn.Linear):
    """An ``nn.Linear`` with one low-rank adapter; ``weight``/``bias`` stay where the base checkpoint puts them."""

    def __init__(self, in_features: int, out_features: int, *, r: int, alpha: float, dropout: float = 0.0,
                 bias: bool = True, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.r, self.lora_alpha = r, alpha
        self.scaling = {ADAPTER: alpha / r}
        self.lora_dropout = nn.ModuleDict({ADAPTER: nn.Dropout(dropout) if dropout > 0 else nn.Identity()})
        self.lora_A = nn.ModuleDict({ADAPTER: nn.Linear(in_features, r, bias=False, device=device, dtype=dtype)})
        self.lora_B = nn.ModuleDict({ADAPTER: nn.Linear(r, out_features, bias=False, device=device, dtype=dtype)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = nn.functional.linear(x, self.weight, self.bias)
        a, b = self.lora_A[ADAPTER], self.lora_B[ADAPTER]
        update = b(a(self.lora_dropout[ADAPTER](x.to(a.weight.dtype))))
        return result + (update * self.scaling[ADAPTER]).to(result.dtype)


def inject_lora(model: nn.Module, targets: Iterable[str], *, r: int, alpha: float, dropout: float = 0.0) -> int:
    """Replace every ``nn.Linear`` whose attribute name is in ``targets`` by a :class:`LoraLinear` sharing its weights.

    The adapter starts as the identity update (``lora_B = 0``, peft's initialisation); returns how many were wrapped.
    """
    targets = set(targets)
    todo = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if name in targets and type(child) is nn.Linear]
    for parent, name, lin in todo:
        lora = LoraLinear(lin.in_features, lin.out_features, r=r, alpha=alpha, dropout=dropout,
                          bias=lin.bias is not None, device=lin.weight.device, dtype=lin.weight.dtype)
        lora.weight = lin.weight
        if lin.bias is not None:
            lora.bias = lin.bias
        with torch.no_grad():
            nn.init.kaiming_uniform_(lora.lora_A[ADAPTER].weight, a=5 ** 0.5)
            nn.init.zeros_(lora.lora_B[ADAPTER].weight)
        lora._is_hf_initialized = True  # keeps transformers' post_init off the base weights it now shares
        setattr(parent, name, lora)
    return len(todo)


class LoraModel(nn.Module):
    """peft's ``LoraModel``: holds the wrapped LM as ``.model``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


class PeftCausalLM(nn.Module):
    """peft's ``PeftModelForCausalLM``: holds a :class:`LoraModel` as ``.base_model``, so names read
    ``base_model.model.model.layers.N...`` exactly as in checkpoints saved from a peft-wrapped model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.base_model = LoraModel(model)

    @property
    def lm(self) -> nn.Module:
        """The wrapped causal LM (``LlamaForCausalLM``)."""
        return self.base_model.model

    def forward(self, *args, **kwargs):
        return self.lm(*args, **kwargs)
