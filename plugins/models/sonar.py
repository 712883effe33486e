"""SONAR (seed 001): the NLLB-based text encoder and a w2v-BERT 2.0 speech encoder, each with its pooling into one
sentence embedding, read from the released fairseq2 checkpoints without fairseq2 (:mod:`.arch.sonar_model`).

Sources: a directory holding the text encoder as released (``sonar_text_encoder.pt``,
``sentencepiece.source.256000.model``; files from dl.fbaipublicfiles.com/SONAR/) with a speech encoder in
``speech/``, or the option ``speech_encoder`` (a ``spenc.*.pt`` file or its folder). Speech encoders are per language
(English ``spenc.eng.pt``, ``spenc.v3ap.fra.pt``, ...): one run loads one, so cross-modal comparisons run per
language. ``trust_pickle`` lets a checkpoint that stores other Python objects besides tensors load (it runs the
file's pickle code). ``tiny`` is a seeded 64-wide pair. Encoders only: no LM, no lens, no generation.

Sites: ``text_encoder`` and ``speech_encoder`` layers, their inputs (``embed``: scaled token embeddings plus
sinusoids; ``features``: the projected fbank frames), final norms, and ``pooled``: the sentence embedding (mean
pooling of the text states; the speech encoder's attention pooler), read as one position. Text items are encoded in
their language (option ``src_lang``: a FLORES-200 code such as ``fra_Latn``, a language code or name, or
``label:<key>``, default the item's ``language`` label); rows are ``__lang__`` text ``</s>`` with span ``text``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from lalm_probe.core.data import Stimulus
from lalm_probe.core.errors import UserError
from lalm_probe.core.languages import find
from lalm_probe.core.model import ModelPlugin, Prepared, Prompt
from lalm_probe.core.positions import Positions
from lalm_probe.core.registry import hookimpl
from lalm_probe.core.stacks import Stack
from lalm_probe.core.templates import bart_layer, conformer_layer
from lalm_probe.core.vocab import Component
from lalm_probe.plugins.models.arch.sonar_checkpoint import TEXT_CARD
from lalm_probe.plugins.models.arch.sonar_model import build_tiny_sonar, load_sonar

TEXT_LAYER = bart_layer(attn_norm="self_attn_layer_norm", o="output_proj", mlp_norm="ffn_layer_norm",
                        fc1="ffn.inner_proj", fc2="ffn.output_proj", mlp="ffn")
SPEECH_LAYER = {
    **conformer_layer(up="inner_proj", down="output_proj", q="q_proj", k="k_proj", v="v_proj", o="output_proj",
                      conv="conv", glu="pointwise_conv1_activation", final_norm="layer_norm"),
    # fairseq2 keeps the convolution's norm on the block, and normalises the depthwise output with a batch norm
    "conv_norm": Component("conv_layer_norm"), "conv_dw_norm": Component("conv.batch_norm", layout="channels_first"),
}


def build_tiny(out_dir: Path) -> None:
    build_tiny_sonar(out_dir)


class Sonar(ModelPlugin):
    name = "sonar"
    description = "SONAR: NLLB text encoder and w2v-BERT speech encoders with pooling (fairseq2 files, no fairseq2)"
    default_checkpoint = TEXT_CARD
    tiny = build_tiny
    lens_stack = None
    padding_side = "right"
    option_defaults = {"speech_encoder": None, "trust_pickle": False, "src_lang": "label:language"}
    option_help = {
        "speech_encoder": "the w2v-BERT speech encoder folder (one language per run)",
        "trust_pickle": "true: load fairseq2 files that need pickle",
        "src_lang": "the text encoder's input language",
    }
    load_options = ("speech_encoder", "trust_pickle")
    stacks = (
        Stack("text_encoder", layers=("text_encoder.encoder.layers",), components=TEXT_LAYER,
              final_norm=("text_encoder.layer_norm",), hidden_states="hidden_states",
              extras={"embed": Component("text_encoder.encoder_frontend", width=lambda m: m.embed.embedding_dim),
                      "pooled": Component("text_encoder.pooling", layout="vector", width="norm",
                                          positions="text_pooled")}),
        Stack("speech_encoder", layers=("speech_encoder.encoder.layers",), components=SPEECH_LAYER,
              final_norm=("speech_encoder.layer_norm",), hidden_states="hidden_states",
              extras={"features": Component("speech_encoder.encoder_frontend",
                                            width=lambda m: m.model_dim_proj.out_features),
                      "pooled": Component("speech_encoder.encoder_pooler", layout="vector",
                                          width=lambda m: m.projection_out.out_features, positions="speech_pooled")}),
    )

    @classmethod
    def load_weights(cls, source: str | Path, *, device: str, dtype: str, device_map: str | None,
                     speech_encoder: str | None = None, trust_pickle: bool = False) -> tuple[torch.nn.Module, Any]:
        return load_sonar(source, speech_encoder=speech_encoder, dtype=dtype, device=device, trust_pickle=trust_pickle)

    def source_language(self, item: Stimulus) -> str:
        """The FLORES-200 code a text item is encoded in (``src_lang``; a language code, a name, or a label)."""
        value = str(self.options["src_lang"])
        if value.startswith("label:"):
            key = value.split(":", 1)[1]
            if key not in item.labels:
                raise UserError(f"Item '{item.id}' has no label '{key}' for src_lang={value}; add the label or set "
                                "src_lang to a language, e.g. src_lang=eng_Latn.")
            value = str(item.labels[key])
        langs = self.tokenizer.langs
        if value in langs:
            return value
        lang = find(value)
        codes = (lang.iso3, *(a.lower() for a in lang.aliases if len(a) == 3)) if lang else ()
        for code in codes:
            hit = [flores for flores in langs if flores.startswith(f"{code}_")]
            if hit:
                return hit[0]
        raise UserError(f"SONAR's text encoder has no language '{value}' (item '{item.id}'); it takes FLORES-200 "
                        f"codes: {', '.join(langs[:8])}, ...")

    def prepare(self, items: Sequence[Stimulus], audio: Sequence[np.ndarray | None],
                prompts: Sequence[Prompt]) -> Prepared:
        if len({it.has_audio for it in items}) > 1:
            raise UserError("SONAR encodes speech and text with different encoders; one batch cannot mix them.")
        if items[0].has_audio:
            batch = self.processor.speech(list(audio), self.sample_rate)
            stack, pooled = "speech_encoder", "speech_pooled"
        else:
            missing = [it.id for it in items if not it.text]
            if missing:
                raise UserError(f"Item '{missing[0]}' has neither audio nor text.")
            batch = self.processor.text([it.text for it in items], [self.source_language(it) for it in items])
            stack, pooled = "text_encoder", "text_pooled"
        rows = [{stack: Positions(0, r.length, dict(r.spans)), pooled: Positions(0, 1)} for r in batch.rows]
        return Prepared(batch.inputs, rows)


@hookimpl
def lalm_probe_models() -> list[type]:
    return [Sonar]
