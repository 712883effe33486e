"""The narrow, read-only view of a model that analyses and interventions get: no forward passes.

Analyses are functions of stores; what they may know about the model is here: its stacks (layer counts, sites,
widths), the logit lens, the tokenizer, how it spells label values and its default prompt. Running the model is
the engine's job, so every number an analysis reports comes from a store and can be recomputed from a run folder.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from .data import Stimulus
from .errors import UserError
from .model import ModelPlugin, Prompt
from .stacks import ResolvedStack


def _tensor(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A tensor of ``x``; a read-only array (a memory-mapped store slice) is copied, as torch cannot guard it."""
    if isinstance(x, torch.Tensor):
        return x
    arr = np.asarray(x)
    return torch.from_numpy(arr if arr.flags.writeable else arr.copy())


def _visible(text: str) -> str:
    """Non-printable characters other than space, newline and tab as ``\\xNN`` escapes."""
    return "".join(c if c.isprintable() or c in " \n\t" else c.encode("unicode_escape").decode() for c in text)


class ModelView:
    """What an analysis may know about a loaded model plugin."""

    def __init__(self, plugin: ModelPlugin) -> None:
        self._plugin = plugin

    @property
    def name(self) -> str:
        return self._plugin.name

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self._plugin.modalities)

    @property
    def lens_stack(self) -> str | None:
        return self._plugin.lens_stack

    @property
    def resolved(self) -> Mapping[str, ResolvedStack]:
        """Every stack: layer count, components, extras, widths, whether it runs per step, lens modules."""
        return self._plugin.resolved

    @property
    def device(self) -> str:
        """Where the model's weights are (``cpu``, ``cuda:0``): analyses may put heavy math there."""
        return str(getattr(self._plugin, "device", "cpu"))

    @property
    def tokenizer(self) -> Any:
        return self._plugin.tokenizer

    def label_words(self, key: str) -> dict[str, str] | None:
        return self._plugin.label_words(key)

    def default_prompt(self, item: Stimulus) -> Prompt:
        return self._plugin.default_prompt(item)

    def width(self, site: str) -> int:
        """Units of a site (``lm.3.mlp_act``)."""
        return self._plugin.width(site)

    def stack_named(self, who: str, stack: str | None, unembed: bool = False) -> str:
        """A plugin option's stack (default: the lens stack), refused (naming ``who``) when the model lacks it or,
        with ``unembed``, when it has no unembedding to read outputs through."""
        stack = stack or self.lens_stack
        st = self.resolved.get(stack) if stack else None
        if st is None or (unembed and st.unembed is None):
            raise UserError(f"{who}: '{self.name}' has no stack '{stack}'{' with an unembedding' if unembed else ''}.")
        return stack

    def layer_site(self, who: str, stack: str | None, layer: int | None, component: str = "out",
                   unembed: bool = False) -> str:
        """``<stack>.<layer>.<component>`` for an intervention's options: the lens stack and its middle layer by
        default, refused (naming ``who``) when the stack is missing, lacks a needed unembedding, or is too short."""
        stack = self.stack_named(who, stack, unembed)
        st = self.resolved[stack]
        layer = st.num_layers // 2 if layer is None else layer
        if not 0 <= layer < st.num_layers:
            raise UserError(f"{who}: layer {layer} is out of range; stack '{stack}' has layers 0..{st.num_layers - 1}.")
        return f"{stack}.{layer}.{component}"

    def causal(self, stack: str) -> bool:
        """Whether a stack is an LM / decoder (its last position has read the whole input) rather than an encoder."""
        st = self.resolved[stack]
        return stack == self.lens_stack or st.unembed is not None or st.spec.runs == "per_step"

    def lens(self, hidden: torch.Tensor | np.ndarray, stack: str | None = None, norm: bool = True,
             layer: int | None = None) -> torch.Tensor:
        """Project hidden states to vocabulary logits: ``unembed(norm(h))`` or ``unembed(h)`` (float32).

        ``layer``: where ``hidden`` comes from. The last layer's state always goes through the final norm, also
        with ``norm=False``: the norm is part of what the model outputs (HF's ``hidden_states[-1]``, which the
        semantic-hub code reads, is after it), so the last layer's lens is the model's own logits.
        """
        name = stack or self.lens_stack
        if name is None or name not in self.resolved:
            raise UserError(f"Model '{self.name}' declares no stack with an unembedding for the logit lens.")
        st = self.resolved[name]
        if st.unembed is None:
            raise UserError(f"Stack '{name}' has no unembedding; the logit lens needs one.")
        model = self._plugin.model
        h = _tensor(hidden).to(self._plugin.device, dtype=next(model.parameters()).dtype)
        norm = norm or (layer is not None and layer % st.num_layers == st.num_layers - 1)
        with torch.no_grad():
            if norm and st.final_norm is not None:
                h = model.get_submodule(st.final_norm)(h)
            return model.get_submodule(st.unembed)(h).float()

    def final_norm(self, hidden: torch.Tensor | np.ndarray, stack: str) -> np.ndarray:
        """``norm(h)`` through a stack's final norm (``h`` unchanged on a stack without one), as float64.

        HF's ``hidden_states[-1]`` (what the semantic-hub code reads as the last layer) is the last block's output
        after this norm; ``<stack>.<L-1>.out`` is before it.
        """
        st = self.resolved[stack]
        x = _tensor(hidden)
        if st.final_norm is None:
            return x.double().cpu().numpy()
        model = self._plugin.model
        with torch.no_grad():
            out = model.get_submodule(st.final_norm)(x.to(self._plugin.device, dtype=next(model.parameters()).dtype))
        return out.double().cpu().numpy()
    def unembedding(self, ids: Any, stack: str | None = None) -> np.ndarray:
        """Rows of the unembedding matrix ``W_U`` for token ids, ``(len(ids), width)`` float32: what a token's
        logit reads from the last state (seed 004 steers with ``W_U[new] - W_U[old]``). Copies: the model is never
        written through them."""
        name = stack or self.lens_stack
        st = self.resolved.get(name) if name else None
        if st is None or st.unembed is None:
            raise UserError(f"Model '{self.name}' has no stack '{name}' with an unembedding.")
        weight = self._plugin.model.get_submodule(st.unembed).weight
        rows = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(rows) and not (0 <= rows.min() and rows.max() < weight.shape[0]):
            raise UserError(f"Token id {int(rows.max() if rows.max() >= weight.shape[0] else rows.min())} is outside "
                            f"the unembedding's {weight.shape[0]} rows.")
        with torch.no_grad():
            return weight[torch.as_tensor(rows, device=weight.device)].float().cpu().numpy().copy()

    def decode_tokens(self, ids: Any) -> list[str]:
        """Token ids as readable text (byte-level BPE pieces decoded, not shown as ``ĠÐ¸``); control characters are
        written as escapes (``\\x06``), so tables and plots show every token."""
        return [_visible(self.tokenizer.decode([int(i)])) for i in np.asarray(ids).reshape(-1)]
