"""LoRA adapters shipped beside a checkpoint (PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``), applied
without peft so their parts are readable sites.

Granite Speech checkpoints keep a LoRA on the LM's attention projections that the model switches on only when audio
is present; transformers applies it through peft, whose version it pins. Here each targeted ``nn.Linear`` becomes a
:class:`LoraLinear` with peft's own child names (``base_layer``, ``lora_A.default``, ``lora_B.default``), so the
adapted projection keeps its path (``self_attn.q_proj``: base + scaling x B(A(x))) and A and B are modules of their
own. A model that peft already adapted keeps peft's modules, which have the same names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from lalm_probe.core.errors import UserError

ADAPTER = "default"  # peft's name for a checkpoint's single adapter


class LoraLinear(torch.nn.Module):
    """``base(x) + scaling * lora_B(lora_A(x))`` while enabled, ``base(x)`` otherwise."""

    def __init__(self, base: torch.nn.Linear, rank: int, scaling: float) -> None:
        super().__init__()
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = torch.nn.ModuleDict({ADAPTER: torch.nn.Linear(base.in_features, rank, bias=False, **kw)})
        self.lora_B = torch.nn.ModuleDict({ADAPTER: torch.nn.Linear(rank, base.out_features, bias=False, **kw)})
        self.scaling = scaling
        self.disable_adapters = False

    def enable_adapters(self, enabled: bool) -> None:  # peft's BaseTunerLayer method of the same name
        self.disable_adapters = not enabled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.disable_adapters:
            return out
        return out + self.scaling * self.lora_B[ADAPTER](self.lora_A[ADAPTER](x))


def read_adapter(source: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """The adapter config and weights beside a checkpoint (a folder or a hub id), or None when it has none."""
    from safetensors.torch import load_file
    from transformers.utils import cached_file

    files = []
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        try:
            files.append(cached_file(str(source), name, _raise_exceptions_for_missing_entries=False))
        except OSError:
            files.append(None)
    if files[0] is None:
        return None
    if files[1] is None:
        raise UserError(f"Checkpoint '{source}' has an adapter_config.json but no adapter_model.safetensors.")
    return json.loads(Path(files[0]).read_text()), load_file(files[1])


def apply_adapter(layers: torch.nn.ModuleList, config: dict[str, Any], weights: dict[str, torch.Tensor],
                  where: str) -> list[str]:
    """Wrap the targeted projections of ``layers`` (an LM's decoder layers) and load A and B; returns the targeted
    module names (``q_proj``...). Keys are matched from ``layers.<i>.`` on, so checkpoints saved under any prefix
    (``base_model.model.language_model.model.layers...`` or ``...model.language_model.layers...``) load."""
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora") or config.get("fan_in_fan_out"):
        raise UserError(f"{where}: only plain LoRA adapters are supported (this one: peft_type="
                        f"{config.get('peft_type')}, use_dora={config.get('use_dora')}).")
    rank, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
    scaling = alpha / (rank ** 0.5 if config.get("use_rslora") else rank)
    state: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in weights.items():
        tail = key.partition("layers.")[2]
        index, _, rest = tail.partition(".")
        if not tail or not index.isdigit() or ".lora_" not in rest:
            continue
        module, _, part = rest.partition(".lora_")
        state.setdefault((int(index), module), {})[part.split(".")[0]] = value
    if not state:
        raise UserError(f"{where}: the adapter has no LoRA weights for the LM's layers.")
    for (index, module), parts in sorted(state.items()):
        layer = layers[index]
        base = layer.get_submodule(module)
        if not isinstance(base, torch.nn.Linear) or set(parts) != {"A", "B"}:
            raise UserError(f"{where}: cannot apply the adapter's LoRA to layers.{index}.{module}.")
        wrapped = LoraLinear(base, rank, scaling)
        wrapped.lora_A[ADAPTER].weight.data.copy_(parts["A"])
        wrapped.lora_B[ADAPTER].weight.data.copy_(parts["B"])
        parent, _, child = module.rpartition(".")
        setattr(layer.get_submodule(parent) if parent else layer, child, wrapped)
    return sorted({module.rpartition(".")[2] for _, module in state})


def lora_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every LoRA layer in ``model``: ours and peft's alike."""
    return [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "enable_adapters")]
