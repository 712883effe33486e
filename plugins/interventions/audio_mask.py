"""Audio masking (AudioLens, seed 003, Fig. 4): the last position may not attend to the audio span.

Applied in the LM's self-attention of every layer (or the chosen ones), only for the query at ``position``;
every other position attends as usual (paper footnote 5), so the model must rely on what earlier text
positions gathered from the audio.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lalm_probe.core.errors import UserError
from lalm_probe.core.plugin import Edit, Intervention
from lalm_probe.core.registry import hookimpl
from lalm_probe.core.view import ModelView


@dataclass
class AudioMask(Intervention):
    name: ClassVar[str] = "audio-mask"
    description: ClassVar[str] = "Block attention from the last position to the audio span in the LM"

    layers: list[int] | None = None  # default: every layer of the stack
    position: str = "last"
    span: str = "audio"
    stack: str | None = None  # default: the model's lens stack (the LM)
    component: str = "attn"

    def edits(self, model: ModelView) -> list[Edit]:
        stack = model.stack_named("audio-mask", self.stack)
        st = model.resolved[stack]
        if self.component not in st.paths:
            raise UserError(f"audio-mask: stack '{stack}' has no '{self.component}' component.")
        layers = self.layers if self.layers is not None else range(st.num_layers)
        return [Edit(site=f"{stack}.{layer}.{self.component}", op="block_attention", positions=self.position,
                     keys=self.span, steps=[1]) for layer in layers]


@hookimpl
def lalm_probe_interventions() -> list[type]:
    return [AudioMask]
