"""The model plugin interface: a declaration of where a model keeps its layers, plus code only where needed.

A plugin declares its stacks (:mod:`~lalm_probe.core.stacks`, built from the layer templates), the transformers
classes that load it and a tiny builder; the default :meth:`ModelPlugin.load` does the rest. Code is written only
where declaration cannot do the job: turning stimuli into model inputs plus per-row position metadata
(:meth:`~ModelPlugin.prepare`, helped by :mod:`~lalm_probe.core.positions`), and decode control.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch

from .data import Stimulus
from .errors import UserError
from .positions import Positions, position_ids
from .sites import parse_sites
from .spec import coerce_value
from .stacks import ResolvedStack, Stack, get_module, resolve_stacks
from .tiny import tiny_checkpoint

__all__ = ["ModelPlugin", "Positions", "Prepared", "Prompt", "Stack", "ResolvedStack", "get_module",
           "load_pretrained", "torch_dtype"]


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


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"Unknown dtype '{name}'. Choose one of: {', '.join(DTYPES)}.")
    return DTYPES[name]


def transformers_class(cls: str | type) -> type:
    """A transformers class from its name (looked up lazily, so listing plugins imports no model code)."""
    if not isinstance(cls, str):
        return cls
    import transformers

    return getattr(transformers, cls)


class ModelPlugin:
    """Base class for a loaded model of one family. Subclasses fill the class attributes; hooks where needed.

    Instances are created by :meth:`load`; they own the torch module, its processor and resolved stacks.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    default_checkpoint: ClassVar[str] = "tiny"
    hub_ids: ClassVar[tuple[str, ...]] = ()  # the family's published checkpoints, listed by `probe info`
    model_class: ClassVar[str | type | None] = None  # transformers class (or its name) that loads the weights
    processor_class: ClassVar[str | type] = "AutoProcessor"
    tiny: ClassVar[Callable[[Path], None] | None] = None  # writes a seeded tiny instance + processor to a folder
    stacks: ClassVar[tuple[Stack, ...]] = ()
    stacks_at_load: ClassVar[tuple[str, ...]] = ()  # stacks added when loading finds them (a checkpoint's LoRA)
    lens_stack: ClassVar[str | None] = None  # the stack whose outputs the logit lens projects
    # Why the lens of a layer's ``out`` is not exactly the model's own readout, where it is not (Gemma 3n reads out
    # four AltUp streams, ``out`` is one); ``probe check`` then tests the lens on what the final norm receives.
    lens_caveat: ClassVar[str | None] = None
    padding_side: ClassVar[str] = "left"
    modalities: ClassVar[tuple[str, ...]] = ("speech", "text")  # what an item may be made of
    audio_token: ClassVar[str | None] = None  # the placeholder the processor expands per audio frame, if any
    # Run-time options (``--model whisper:language=en``) and their defaults; the default's type is the option's.
    option_defaults: ClassVar[dict[str, Any]] = {}
    option_help: ClassVar[dict[str, str]] = {}  # what each option does, for `probe info`
    # Options that say where the weights come from (a release's per-part sources): passed to ``load_weights``.
    load_options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: torch.nn.Module, processor: Any, checkpoint: str) -> None:
        self.model = model.eval()
        self.processor = processor
        self.checkpoint = checkpoint
        self.options: dict[str, Any] = dict(self.option_defaults)
        self.setup()
        self.resolved: dict[str, ResolvedStack] = resolve_stacks(model, self.stacks, self.name)

    def configure(self, **options: Any) -> "ModelPlugin":
        """Set run-time options, coerced to the type of their defaults; unknown names are refused."""
        self.options.update(self.coerce_options(options))
        return self

    @classmethod
    def coerce_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """Options coerced to the type of their defaults; unknown names are refused."""
        unknown = sorted(set(options) - set(cls.option_defaults))
        if unknown:
            raise UserError(f"Model '{cls.name}': unknown option(s) {unknown}; valid: "
                            f"{', '.join(cls.option_defaults) or 'none'}.")
        out = {}
        for key, value in options.items():
            default = cls.option_defaults[key]
            tp = str if default is None else type(default)
            out[key] = coerce_value(value, tp | None, f"model '{cls.name}' option '{key}'")
        return out

    # ---- loading ------------------------------------------------------------------------------------
    @classmethod
    def load(cls, checkpoint: str, device: str = "cpu", dtype: str = "float32", device_map: str | None = None,
             options: dict[str, Any] | None = None) -> "ModelPlugin":
        """Load weights and processor from a hub id, a local directory or ``tiny``, then set ``options``.

        The options named in ``load_options`` (where a release's parts come from) go to ``load_weights``, so a
        model assembled from several sources takes them on the command line like any other option.
        """
        opts = cls.coerce_options(options or {})
        parts = {k: opts.get(k, cls.option_defaults[k]) for k in cls.load_options}
        model, processor = cls.load_weights(cls.source(checkpoint), device=device, dtype=dtype, device_map=device_map,
                                            **parts)
        return cls(model, processor, checkpoint).configure(**opts)

    @classmethod
    def source(cls, checkpoint: str) -> str | Path:
        """Where the weights are: ``tiny`` is built once into the cache; anything else is passed on."""
        if checkpoint != "tiny":
            return checkpoint
        if cls.tiny is None:
            raise UserError(f"Model '{cls.name}' has no tiny instance; pass --checkpoint <hub id or folder>.")
        return tiny_checkpoint(cls.name, cls.tiny)

    @classmethod
    def load_weights(cls, source: str | Path, *, device: str, dtype: str,
                     device_map: str | None) -> tuple[torch.nn.Module, Any]:
        """Model and processor from ``source`` through the declared transformers classes."""
        if cls.model_class is None:
            raise NotImplementedError(f"{cls.__name__} declares no model_class and does not override load_weights")
        return load_pretrained(transformers_class(cls.model_class), transformers_class(cls.processor_class), source,
                               device=device, dtype=dtype, device_map=device_map, plugin=cls.name)

    def setup(self) -> None:
        """Adjust the loaded model or processor before its stacks are resolved (default: the padding side)."""
        tok = getattr(self.processor, "tokenizer", None)
        if tok is not None and hasattr(tok, "padding_side"):
            tok.padding_side = self.padding_side

    # ---- inputs ---------------------------------------------------------------------------------------
    def prepare(self, items: Sequence[Stimulus], audio: Sequence[np.ndarray | None],
                prompts: Sequence[Prompt]) -> Prepared:
        """Build one padded batch and the per-row position metadata."""
        raise NotImplementedError

    def default_prompt(self, item: Stimulus) -> Prompt:
        """The prompt used when an analysis does not impose one: the item's own prompt, or none."""
        return Prompt(user=item.prompt)

    def batch_key(self, item: Stimulus) -> Any:
        """Items with different keys never share a batch (speech and text take different encoders)."""
        return "speech" if item.has_audio else "text"

    def accepts(self, item: Stimulus) -> bool:
        """Whether the item is made of something this model takes (speech, text)."""
        return ("speech" if item.has_audio else "text") in self.modalities

    def label_words(self, key: str) -> dict[str, str] | None:
        """How this model spells label values as tokens (Whisper: language ``de`` -> ``<|de|>``), if it has a way."""
        return None

    def max_seconds(self) -> float | None:
        """The longest clip the model reads whole (its processor would cut a longer one), or None without a limit.

        Longer clips are refused, not silently cut: a result should never rest on audio the model did not hear.
        """
        return None

    # ---- generation -----------------------------------------------------------------------------------
    def generate_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments for ``model.generate`` (greedy by default, so runs are reproducible)."""
        return {"do_sample": False, "num_beams": 1}

    def decides_before_generating(self, prepared: Prepared) -> bool:
        """Whether :meth:`generation_inputs` decides something from the forward prompt's last logits (Whisper detects
        the language there); the engine then hands it those logits computed under the run's prompt-pass edits."""
        return False

    def generation_inputs(self, prepared: Prepared, first_logits: torch.Tensor | None = None) -> Prepared:
        """The batch as ``generate`` takes it; its rows say where the decoder prompt sits on per-step stacks.
        ``first_logits``: ``(rows, vocab)`` at the forward prompt's last position, edits applied (see
        :meth:`decides_before_generating`)."""
        if prepared.generate_inputs is None:
            return prepared
        return Prepared(prepared.generate_inputs, prepared.rows, meta=dict(prepared.meta))

    def room(self, generation: Prepared) -> int | None:
        """How many tokens the model can generate after this batch's prompt (None: no limit it knows of)."""
        return None

    def decode_outputs(self, sequences: torch.Tensor, prepared: Prepared) -> list[dict[str, Any]]:
        """One ``{"output": text, ...}`` per row from ``generate``'s sequences (prompt removed)."""
        ids = (prepared.generate_inputs or prepared.inputs).get("input_ids")
        start = ids.shape[1] if ids is not None and sequences.shape[1] > ids.shape[1] else 0
        texts = self.tokenizer.batch_decode(sequences[:, start:], skip_special_tokens=True)
        return [{"output": t.strip()} for t in texts]

    def target_ids(self, text: str) -> list[int]:
        """Token ids of a target text to force as the decoded prefix (no special tokens)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def teacher_forced(self, prepared: Prepared, generation: Prepared, tokens: torch.Tensor) -> Prepared:
        """The forward-pass batch that reads ``tokens`` (batch, n) after the generation prompt: teacher forcing.

        Decode step t of generation equals this pass with the first t-1 generated tokens. Default: the tokens are
        appended to the decoder input (``decoder_input_ids`` of an encoder-decoder, else a left-padded LM's
        ``input_ids``, with mask and position ids extended).
        """
        inputs = dict(prepared.inputs)
        key = "decoder_input_ids" if "decoder_input_ids" in inputs else "input_ids"
        inputs[key] = torch.cat([inputs[key], tokens.to(inputs[key].device)], 1)
        mask = "decoder_attention_mask" if key == "decoder_input_ids" else "attention_mask"
        if mask in inputs:
            ones = torch.ones_like(tokens, dtype=inputs[mask].dtype, device=inputs[mask].device)
            inputs[mask] = torch.cat([inputs[mask], ones], 1)
            if key == "input_ids" and "position_ids" in inputs:
                inputs["position_ids"] = position_ids(inputs[mask])
        n = tokens.shape[1]
        per_step = [name for name, r in self.resolved.items() if r.spec.runs == "per_step"]
        rows = [{name: (replace(p, length=p.length + n) if name in per_step else p) for name, p in row.items()}
                for row in prepared.rows]
        return Prepared(inputs, rows)

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

    def width(self, site: str) -> int:
        """Units of a site (``lm.3.mlp_act``, ``audio_encoder.projector``)."""
        (parsed,) = parse_sites([site], self.resolved)
        return self.resolved[parsed.stack].width(parsed.component, parsed.layer)

    def describe(self) -> dict[str, Any]:
        """Stacks, layer counts, sites and widths: what ``probe info`` prints."""
        out = {}
        for name, r in self.resolved.items():
            comps = {c: (w[0] if len(set(w)) == 1 else list(w)) for c, w in r.widths.items() if c in r.paths}
            out[name] = {"layers": r.num_layers, "runs": r.spec.runs, "components": comps,
                         "extras": {e: r.widths[e][0] for e in r.extras}, "path": r.layers_path,
                         "lens": r.unembed is not None}
        return out


def _cached(repo: str) -> bool:
    """Whether a hub id's config is already in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub answers within seconds (offline, transformers would retry for much longer)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("//")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_pretrained(model_cls: Any, processor_cls: Any, source: str | Path, *, device: str, dtype: str,
                    device_map: str | None, plugin: str) -> tuple[torch.nn.Module, Any]:
    """``from_pretrained`` for model and processor with one clear sentence when the checkpoint is unavailable."""
    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype)}
    if device_map:
        if importlib.util.find_spec("accelerate") is None:
            raise UserError("--device-map needs the accelerate package: pip install 'lalm-probe[gpu]' (or "
                            "pip install accelerate).")
        kwargs["device_map"] = device_map
    src = str(source)
    is_dir = Path(src).is_dir()
    if not is_dir and (Path(src).exists() or src.startswith((".", "/", "~"))):
        raise UserError(f"Checkpoint directory '{src}' does not exist (or is not a directory); pass a local "
                        f"model folder, a hub id, or 'tiny'.")
    if not is_dir and not _cached(src) and not _hub_reachable():
        raise UserError(f"Checkpoint '{src}' is not in the local Hugging Face cache and the hub cannot be reached "
                        f"from here; download it on a machine with network access (`hf download {src}`) and pass "
                        "--checkpoint <local dir>, or use --checkpoint tiny for an offline smoke test.")
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
