"""The model plugin interface: a mostly declarative description of where a model keeps its layers.

A plugin declares named *stacks* (``audio_encoder``, ``lm``, ``speech_encoder``, ``text_decoder``...), each with
candidate module paths (paths move between transformers versions), whether it runs once per input or once per
decode step, and its per-layer components. Code is written only where declaration cannot do the job: loading,
turning stimuli into model inputs plus per-row position metadata, and decode control.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np
import torch

from .data import Stimulus
from .errors import UserError


@dataclass(frozen=True)
class Stack:
    """A homogeneous stack of layers, e.g. the LM's decoder layers.

    ``components`` maps a site component name to a path relative to one layer; ``""`` is the layer itself
    (its output is the residual stream after the block). ``extras`` are stack-level modules addressed as
    ``stack.<name>`` (e.g. a projector or a length adaptor).
    """

    name: str
    layers: tuple[str, ...]
    components: Mapping[str, str] = field(default_factory=lambda: {"out": ""})
    runs: str = "once"  # "once" per input, or "per_step" during generation
    final_norm: tuple[str, ...] = ()
    unembed: tuple[str, ...] = ()
    extras: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass
class Positions:
    """How one row sits on one stack's sequence axis: where its valid part starts, how long it is, named spans.

    Spans are ``[start, end)`` relative to ``offset``, so they do not depend on how the batch was padded.
    """

    offset: int
    length: int
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)
    row: int | None = None  # index on this stack's batch axis when it differs from the row's (e.g. audio clips)


@dataclass
class Prepared:
    """Model inputs for one batch and, per row, its positions on each stack (keyed by stack name)."""

    inputs: dict[str, Any]
    rows: list[dict[str, Positions]]
    generate_inputs: dict[str, Any] | None = None  # for ``model.generate`` when they differ (decoder prompt, tgt_lang)
    meta: dict[str, Any] = field(default_factory=dict)  # what the plugin wants back in decode_outputs


@dataclass
class Prompt:
    """What the text side of an item says: a user turn and an optional start of the assistant's answer."""

    user: str | None = None
    assistant_prefix: str | None = None


def get_module(root: torch.nn.Module, path: str) -> torch.nn.Module:
    """Follow a dotted path (``model.language_model.layers``) from ``root``; KeyError-free AttributeError if absent."""
    mod: Any = root
    for part in path.split("."):
        mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
    return mod


def resolve_path(root: torch.nn.Module, candidates: Sequence[str], what: str) -> str:
    """Return the first candidate path that exists, or fail with one sentence naming every path tried."""
    for path in candidates:
        try:
            get_module(root, path)
            return path
        except (AttributeError, IndexError, TypeError):
            continue
    raise UserError(f"{what}: none of the module paths {list(candidates)} exists in {type(root).__name__}; "
                    "the model plugin does not match this checkpoint's architecture.")


@dataclass(frozen=True)
class ResolvedStack:
    """A stack whose paths were checked against the loaded model."""

    spec: Stack
    layers_path: str
    num_layers: int
    final_norm: str | None
    unembed: str | None
    extras: Mapping[str, str]

    def module_path(self, layer: int, component: str) -> str:
        rel = self.spec.components[component]
        base = f"{self.layers_path}.{layer}"
        return f"{base}.{rel}" if rel else base


def resolve_stacks(model: torch.nn.Module, stacks: Sequence[Stack], plugin: str) -> dict[str, ResolvedStack]:
    """Validate every declared path at load time, so a mismatch fails before any data is processed."""
    out = {}
    for st in stacks:
        layers_path = resolve_path(model, st.layers, f"Model plugin '{plugin}', stack '{st.name}'")
        layers = get_module(model, layers_path)
        n = len(layers)
        for comp, rel in st.components.items():
            if rel:
                for i in range(n):
                    resolve_path(layers[i], [rel], f"Model plugin '{plugin}', site '{st.name}.{i}.{comp}'")
        norm = resolve_path(model, st.final_norm, f"'{st.name}' final norm") if st.final_norm else None
        unembed = resolve_path(model, st.unembed, f"'{st.name}' unembedding") if st.unembed else None
        extras = {k: resolve_path(model, v, f"'{st.name}.{k}'") for k, v in st.extras.items()}
        out[st.name] = ResolvedStack(st, layers_path, n, norm, unembed, extras)
    return out


class ModelPlugin:
    """Base class for a loaded model of one family. Subclasses fill the class attributes and three hooks.

    Instances are created by :meth:`load`; they own the torch module, its processor and resolved stacks.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    default_checkpoint: ClassVar[str] = "tiny"
    stacks: ClassVar[tuple[Stack, ...]] = ()
    lens_stack: ClassVar[str | None] = None  # the stack whose outputs the logit lens projects
    padding_side: ClassVar[str] = "left"
    modalities: ClassVar[tuple[str, ...]] = ("speech", "text")  # what an item may be made of
    # Run-time options (``--model whisper:language=en``) and their defaults; the default's type is the option's.
    option_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, model: torch.nn.Module, processor: Any, checkpoint: str) -> None:
        self.model = model.eval()
        self.processor = processor
        self.checkpoint = checkpoint
        self.resolved = resolve_stacks(model, self.stacks, self.name)
        self.options: dict[str, Any] = dict(self.option_defaults)

    def configure(self, **options: Any) -> "ModelPlugin":
        """Set run-time options, coerced to the type of their defaults; unknown names are refused."""
        from .spec import coerce_value

        unknown = sorted(set(options) - set(self.option_defaults))
        if unknown:
            raise UserError(f"Model '{self.name}': unknown option(s) {unknown}; valid: "
                            f"{', '.join(self.option_defaults) or 'none'}.")
        for key, value in options.items():
            default = self.option_defaults[key]
            tp = str if default is None else type(default)
            self.options[key] = coerce_value(value, tp | None, f"model '{self.name}' option '{key}'")
        return self

    # ---- hooks a plugin implements -------------------------------------------------------------------
    @classmethod
    def load(cls, checkpoint: str, device: str = "cpu", dtype: str = "float32",
             device_map: str | None = None) -> "ModelPlugin":
        """Load weights and processor from a hub id, a local directory or ``tiny``."""
        raise NotImplementedError

    def prepare(self, items: Sequence[Stimulus], audio: Sequence[np.ndarray | None],
                prompts: Sequence[Prompt]) -> Prepared:
        """Build one padded batch and the per-row position metadata."""
        raise NotImplementedError

    def generate_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments for ``model.generate`` (greedy by default, so runs are reproducible)."""
        return {"do_sample": False, "num_beams": 1}

    def decode_outputs(self, sequences: torch.Tensor, prepared: Prepared) -> list[dict[str, Any]]:
        """One ``{"output": text, ...}`` per row from ``generate``'s sequences (prompt removed).

        Decoder-only models return prompt + new tokens; encoder-decoders override this when they differ.
        """
        ids = (prepared.generate_inputs or prepared.inputs).get("input_ids")
        start = ids.shape[1] if ids is not None and sequences.shape[1] > ids.shape[1] else 0
        texts = self.tokenizer.batch_decode(sequences[:, start:], skip_special_tokens=True)
        return [{"output": t.strip()} for t in texts]

    def label_words(self, key: str) -> dict[str, str] | None:
        """How this model spells label values as tokens (Whisper: language ``de`` -> ``<|de|>``), if it has a way."""
        return None

    def batch_key(self, item: Stimulus) -> Any:
        """Items with different keys never share a batch (speech and text take different encoders)."""
        return "speech" if item.has_audio else "text"

    def generation_inputs(self, prepared: Prepared) -> Prepared:
        """The batch as ``generate`` takes it; its rows say where the decoder prompt sits on per-step stacks."""
        if prepared.generate_inputs is None:
            return prepared
        return Prepared(prepared.generate_inputs, prepared.rows)

    def target_ids(self, text: str) -> list[int]:
        """Token ids of a target text to force as the decoded prefix (no special tokens)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def accepts(self, item: Stimulus) -> bool:
        """Whether the item is made of something this model takes (speech, text)."""
        return ("speech" if item.has_audio else "text") in self.modalities

    # ---- derived helpers ----------------------------------------------------------------------------
    @property
    def sample_rate(self) -> int:
        fe = getattr(self.processor, "feature_extractor", None)
        return int(getattr(fe, "sampling_rate", 16000))

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def default_prompt(self, item: Stimulus) -> Prompt:
        """The prompt used when an analysis does not impose one: the item's own prompt, or none."""
        return Prompt(user=item.prompt)

    def describe(self) -> dict[str, Any]:
        """Stacks, layer counts and sites: what ``probe info`` prints."""
        return {name: {"layers": r.num_layers, "runs": r.spec.runs, "components": list(r.spec.components),
                       "extras": list(r.extras), "path": r.layers_path,
                       "lens": bool(r.final_norm or r.unembed)}
                for name, r in self.resolved.items()}


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"Unknown dtype '{name}'. Choose one of: {', '.join(DTYPES)}.")
    return DTYPES[name]


def load_pretrained(model_cls: Any, processor_cls: Any, source: str | Path, *, device: str, dtype: str,
                    device_map: str | None, plugin: str) -> tuple[torch.nn.Module, Any]:
    """``from_pretrained`` for model and processor with one clear sentence when the checkpoint is unavailable."""
    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype)}
    if device_map:
        kwargs["device_map"] = device_map
    src = str(source)
    is_dir = Path(src).is_dir()
    if not is_dir and (Path(src).exists() or src.startswith((".", "/", "~"))):
        raise UserError(f"Checkpoint directory '{src}' does not exist (or is not a directory); pass a local "
                        f"model folder, a hub id, or 'tiny'.")
    try:
        processor = processor_cls.from_pretrained(src)
        model = model_cls.from_pretrained(src, **kwargs)
    except (OSError, ValueError) as exc:
        where = "the local directory" if is_dir else "the local Hugging Face cache or the hub"
        raise UserError(
            f"Could not load {plugin} checkpoint '{src}' from {where} ({str(exc).splitlines()[0][:160]}). "
            f"Download it on a machine with network access (`hf download {src}`), pass --checkpoint <local dir>, "
            f"or use --checkpoint tiny for an offline smoke test.") from None
    if not device_map:
        try:
            model = model.to(device)
        except (RuntimeError, AssertionError) as exc:
            raise UserError(f"Cannot move the model to device '{device}': {exc}") from None
    return model.eval(), processor
