"""An example lalm-probe plugin package: a model, an analysis and an intervention.

The model is declared from a layer template and Qwen2-Audio's input code, and registered by an entry point that
names its class directly; the analysis and the intervention come through a module's hook implementations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from lalm_probe.core.data import Dataset
from lalm_probe.core.plugin import Analysis, Edit, Intervention, Requirements, Stores
from lalm_probe.core.registry import hookimpl
from lalm_probe.core.results import Result, Table
from lalm_probe.core.stacks import Stack
from lalm_probe.core.templates import decoder_layer
from lalm_probe.core.view import ModelView
from lalm_probe.plugins.models.qwen2audio import Qwen2Audio


class TinyMeanLM(Qwen2Audio):
    """Qwen2-Audio's loading and input code, exposing only the language model stack."""

    name = "tiny-mean-lm"
    description = "Example: the tiny Qwen2-Audio, LM stack only"
    default_checkpoint = "tiny"
    stacks = (Stack("lm", layers=("model.language_model.layers",), runs="per_step", components=decoder_layer(),
                    final_norm=("model.language_model.norm",), unembed=("lm_head",), hidden_states="hidden_states"),)

    def audio_positions(self, inputs: dict, clip: int) -> dict:
        return {}  # no audio-encoder stack is exposed


@dataclass
class Norms(Analysis):
    name: ClassVar[str] = "norms"
    description: ClassVar[str] = "Example: L2 norm of each layer's output at the last position"
    stack: str = "lm"

    def requirements(self, model: ModelView, dataset: Dataset) -> Requirements:
        return Requirements(sites=[f"{self.stack}.*.out"], positions=["last"])

    def analyze(self, model: ModelView, dataset: Dataset, stores: Stores) -> Result:
        n = model.resolved[self.stack].num_layers
        ids = [it.id for it in dataset]
        result = Result()
        for name, store in stores.activations():
            norms = np.array([np.linalg.norm(store.array(f"{self.stack}.{i}.out@last", ids)[:], axis=1).mean()
                              for i in range(n)])
            result.arrays[f"{name}/norms"] = norms
            result.summary[f"mean norm ({name})"] = float(norms.mean())
            result.tables.append(Table(f"Norm per layer ({name})", [{"layer": i, "norm": v} for i, v in enumerate(norms)]))
        return result


@dataclass
class ShiftLayer(Intervention):
    name: ClassVar[str] = "shift-layer"
    description: ClassVar[str] = "Example: add a constant to every unit of one layer's output at every position"
    layer: int = 0
    amount: float = 1.0
    stack: str = "lm"

    def edits(self, model: ModelView) -> list[Edit]:
        site = f"{self.stack}.{self.layer}.out"
        return [Edit(site=site, op="add", positions="all",
                     value=np.full(model.width(site), self.amount, dtype=np.float32))]


@hookimpl
def lalm_probe_analyses() -> list[type]:
    return [Norms]


@hookimpl
def lalm_probe_interventions() -> list[type]:
    return [ShiftLayer]
