"""SeamlessM4T v2 (``SeamlessM4Tv2Model``): Conformer speech encoder + length adaptor, text encoder, text decoder.

Sources: a hub id (default ``facebook/seamless-m4t-v2-large``), a local directory, or ``tiny`` (a seeded, randomly
initialised instance of the real class with an offline processor). The full model routes ``input_features`` to the
speech encoder and ``input_ids`` to the text encoder; both feed the one text decoder. Only text is generated
(``generate_speech=False``), so the four text-output tasks are covered: speech-to-text translation and ASR (speech
item, ``tgt_lang`` = another language or the spoken one) and text-to-text translation and text repetition.

Options (``--model seamless-m4t-v2:tgt_lang=fra``):

- ``tgt_lang``: the output language, an ISO 639-3 Seamless code (``fra``, ``cmn``) or ISO 639-1 (``fr``, ``zh``), or
  ``label:<key>`` to take each item's label (``label:language`` gives ASR / text repetition: target = source).
- ``src_lang``: the source language of text items (the tokenizer puts ``__src__`` first); same forms, default
  ``label:language``. Speech items need none.

The decoder prompt is ``[</s>, __tgt__]`` per row and is passed as ``decoder_input_ids`` both to the forward pass
and to ``generate``, so rows of one batch may have different target languages (``generate(tgt_lang=...)`` would
take one per batch). Prompts (instructions, assistant prefixes) do not apply to this model and are ignored.

Stacks (components in the canonical vocabulary; ``probe info --model seamless-m4t-v2 --checkpoint tiny`` lists them
with their widths):

- ``speech_encoder`` (``speech_encoder.encoder.layers``, Conformer; positions = stacked fbank frames, 50/s): every
  part of seed 002 A.8, ``ffn1_*`` (the first, half-step feed-forward), ``attn_*``, ``conv_*`` (the channel-first
  convolution outputs are read time-major through taps), ``mlp_*`` (the second feed-forward, ``ffn2``) and
  ``final_norm`` (the layer's output). Extras ``features`` (the projected input features) and ``norm``.
- ``speech_adaptor`` (``speech_encoder.adapter.layers``): the length adaptor shortens the sequence 8x, so it is its
  own stack with its own positions. Extra ``output`` (``speech_encoder.inner_layer_norm``): the speech encoder's
  output, what the decoder cross-attends to (seed 001's "after the length adaptor").
- ``text_encoder`` (``text_encoder.layers``; positions = ``__src__ text </s>``, right padded; span ``text``). Extras
  ``embed`` (scaled token embeddings, no positions) and ``norm``.
- ``text_decoder`` (runs per decode step; positions = ``[</s>, __tgt__]`` then one per step): self- and
  cross-attention, MLP; final norm and ``lm_head``: the logit-lens stack.
- ``cross_kv`` (the same layers, runs once): ``cross_k`` / ``cross_v`` project the *encoder* output (adaptor frames
  for speech, text-encoder tokens for text), so they are read on its positions, at the prompt pass only.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from lalm_probe.core import languages
from lalm_probe.core.data import Stimulus
from lalm_probe.core.errors import PluginError, UserError
from lalm_probe.core.model import ModelPlugin, Prepared, Prompt
from lalm_probe.core.positions import Positions, valid_ranges
from lalm_probe.core.registry import hookimpl
from lalm_probe.core.stacks import Stack
from lalm_probe.core.templates import bart_layer, conformer_layer, cross_kv_layer
from lalm_probe.core.vocab import Component

TINY_LANGS = ("eng", "fra", "deu", "spa", "cmn", "jpn", "ind", "ita", "kor", "rus", "vie")

NLLB_LAYER = dict(mlp_norm="ffn_layer_norm", fc1="ffn.fc1", fc2="ffn.fc2", mlp="ffn")
# The length adaptor's layers: attention and feed-forward on adaptor frames. Their own layer norms before pooling run
# on encoder frames (another time axis) and are not exposed.
ADAPTOR_LAYER = {
    "out": Component("", width="attn_o"), "attn_q": "self_attn.linear_q", "attn_k": "self_attn.linear_k",
    "attn_v": "self_attn.linear_v", "attn_o": "self_attn.linear_out", "attn": Component("self_attn", width="attn_o"),
    "mlp_norm": "ffn_layer_norm", "mlp_up": "ffn.intermediate_dense",
    "mlp_act": Component("ffn.output_dense", io="input"), "mlp_down": "ffn.output_dense",
    "mlp": Component("ffn", width="mlp_down"),
}


def build_tiny(out_dir: Path) -> None:
    """A 64-wide SeamlessM4T v2 (2 speech, 2 text encoder, 4 decoder layers) with the real processor, seeded."""
    from transformers import (
        SeamlessM4TFeatureExtractor,
        SeamlessM4TProcessor,
        SeamlessM4TTokenizer,
        SeamlessM4Tv2Config,
        SeamlessM4Tv2Model,
    )

    # Character-level pieces plus "▁x" word starts (with their merges), so words start with distinct tokens.
    lower = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3, "▁": 4}
    for piece in [*lower, *lower.upper(), *"0123456789.,!?'-:;\"()éèàçüöäßñ", *(f"▁{c}" for c in lower),
                  *(f"▁{c}" for c in lower.upper())]:
        vocab.setdefault(piece, len(vocab))
    merges = [("▁", c) for c in lower + lower.upper()]
    tok = SeamlessM4TTokenizer(vocab=vocab, merges=merges, src_lang="eng", tgt_lang="eng",
                               additional_special_tokens=[f"__{code}__" for code in TINY_LANGS])
    processor = SeamlessM4TProcessor(feature_extractor=SeamlessM4TFeatureExtractor(), tokenizer=tok)
    n = len(TINY_LANGS)
    cfg = SeamlessM4Tv2Config(
        vocab_size=len(tok), hidden_size=64, max_position_embeddings=256,
        encoder_layers=2, decoder_layers=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
        encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_layerdrop=0.0, decoder_layerdrop=0.0, speech_encoder_layerdrop=0.0,
        dropout=0.0, attention_dropout=0.0, adaptor_dropout=0.0,
        speech_encoder_layers=2, speech_encoder_attention_heads=4, speech_encoder_intermediate_size=128,
        feature_projection_input_dim=160, conv_depthwise_kernel_size=5,
        # the text-to-unit model and vocoder are always built by SeamlessM4Tv2Model: keep them tiny too
        t2u_vocab_size=32, char_vocab_size=64, t2u_encoder_layers=1, t2u_decoder_layers=1,
        t2u_encoder_ffn_dim=64, t2u_decoder_ffn_dim=64, t2u_encoder_attention_heads=2, t2u_decoder_attention_heads=2,
        t2u_max_position_embeddings=256, t2u_variance_predictor_embed_dim=64, t2u_variance_predictor_hidden_dim=32,
        unit_hifi_gan_vocab_size=28, unit_embed_dim=16, lang_embed_dim=8, spkr_embed_dim=8,
        vocoder_num_langs=n, vocoder_num_spkrs=2, upsample_initial_channel=16,
        upsample_rates=(5, 4), upsample_kernel_sizes=(11, 8), resblock_kernel_sizes=(3,),
        resblock_dilation_sizes=((1, 3),),
        pad_token_id=0, bos_token_id=2, eos_token_id=3, decoder_start_token_id=3)
    torch.manual_seed(0)
    model = SeamlessM4Tv2Model(cfg).eval()
    gc = model.generation_config
    gc.text_decoder_lang_to_code_id = {code: tok.convert_tokens_to_ids(f"__{code}__") for code in TINY_LANGS}
    gc.t2u_lang_code_to_id = {code: i for i, code in enumerate(TINY_LANGS)}
    gc.vocoder_lang_code_to_id = {code: i for i, code in enumerate(TINY_LANGS)}
    gc._from_model_config = False  # otherwise from_pretrained drops the custom language maps
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


class SeamlessM4Tv2(ModelPlugin):
    name = "seamless-m4t-v2"
    description = "SeamlessM4T v2: Conformer speech encoder + length adaptor, text encoder, shared text decoder"
    default_checkpoint = "facebook/seamless-m4t-v2-large"
    lens_stack = "text_decoder"
    padding_side = "right"
    option_defaults = {"tgt_lang": "eng", "src_lang": "label:language"}
    option_help = {
        "tgt_lang": "the language the decoder writes: ISO 639-1 or 639-3, or label:<key>",
        "src_lang": "the text encoder's input language: a code or label:<key>",
    }
    hub_ids = ("facebook/seamless-m4t-v2-large",)
    model_class = "SeamlessM4Tv2Model"
    processor_class = "SeamlessM4TProcessor"
    tiny = build_tiny
    stacks = (
        Stack("speech_encoder", layers=("speech_encoder.encoder.layers",), components=conformer_layer(),
              final_norm=("speech_encoder.encoder.layer_norm",), hidden_states="encoder_hidden_states",
              extras={"features": Component("speech_encoder.feature_projection",
                                            width=lambda m: m.projection.out_features)}),
        Stack("speech_adaptor", layers=("speech_encoder.adapter.layers",), components=ADAPTOR_LAYER,
              extras={"output": "speech_encoder.inner_layer_norm"}),
        Stack("text_encoder", layers=("text_encoder.layers",), components=bart_layer(**NLLB_LAYER),
              final_norm=("text_encoder.layer_norm",), hidden_states="encoder_hidden_states",
              extras={"embed": "text_encoder.embed_tokens"}),
        Stack("text_decoder", layers=("text_decoder.layers",), runs="per_step",
              components=bart_layer(cross="cross_attention", cross_norm="cross_attention_layer_norm", **NLLB_LAYER),
              final_norm=("text_decoder.layer_norm",), unembed=("lm_head",), hidden_states="decoder_hidden_states"),
        Stack("cross_kv", layers=("text_decoder.layers",), components=cross_kv_layer("cross_attention")),
    )

    def setup(self) -> None:
        super().setup()
        _mask_adaptor_padding(self.model)
        # The full model logs a warning on every forward pass ("This calls the same method `forward` as ...").
        logging.getLogger("transformers.models.seamless_m4t_v2.modeling_seamless_m4t_v2").setLevel(logging.ERROR)

    @classmethod
    def load_weights(cls, source: str | Path, *, device: str, dtype: str,
                     device_map: str | None) -> tuple[torch.nn.Module, Any]:
        model, processor = super().load_weights(source, device=device, dtype=dtype, device_map=device_map)
        if not getattr(model.generation_config, "text_decoder_lang_to_code_id", None):
            raise PluginError(f"Checkpoint '{source}' has no generation_config.text_decoder_lang_to_code_id, so "
                              "target languages cannot be set; use a SeamlessM4T v2 checkpoint with its "
                              "generation_config.json.")
        return model, processor

    # ---- languages ----------------------------------------------------------------------------------
    @property
    def target_languages(self) -> dict[str, int]:
        """Seamless code -> token id of ``__code__`` for every language the decoder can be asked to produce."""
        return dict(self.model.generation_config.text_decoder_lang_to_code_id)

    def _supported_sources(self) -> list[str]:
        tok = self.tokenizer
        codes = {t[2:-2] for t in tok.all_special_tokens if t.startswith("__") and t.endswith("__") and len(t) > 4}
        return sorted(codes | set(self.target_languages))

    def _code(self, value: Any, item: Stimulus, option: str, role: str) -> str:
        """A Seamless code from an option value (``fra``, ``fr``, ``French``, ``__fra__`` or ``label:<key>``)."""
        text = str(value).strip()
        if text.startswith("label:"):
            key = text.split(":", 1)[1]
            if key not in item.labels:
                have = ", ".join(sorted(item.labels)) or "none"
                raise UserError(f"Item '{item.id}' has no label '{key}' for {option}={text} (its labels: {have}); "
                                f"add the label or set {option} to a language code, e.g. {option}=eng.")
            text = str(item.labels[key]).strip()
        code = text.strip("_").lower()
        known = languages.find(code)  # ISO 639-1, a name or a regional tag such as zh-CN -> Seamless's ISO 639-3
        code = known.iso3 if known else code
        supported = sorted(self.target_languages) if role == "target" else self._supported_sources()
        if code not in supported:
            raise UserError(f"Model '{self.name}' ({self.checkpoint}) has no {role} language '{text}' "
                            f"({option}, item '{item.id}'). Supported: {', '.join(supported)} (as ISO 639-3 codes; "
                            "ISO 639-1 codes such as 'zh' and English names are mapped to them).")
        return code

    def target_language(self, item: Stimulus) -> str:
        return self._code(self.options["tgt_lang"], item, "tgt_lang", "target")

    def source_language(self, item: Stimulus) -> str:
        return self._code(self.options["src_lang"], item, "src_lang", "source")

    def label_words(self, key: str) -> dict[str, str] | None:
        """For ``language``: ISO 639-1 label values -> the ``__xxx__`` token the decoder emits at its first step."""
        if key != "language":
            return None
        supported = self.target_languages
        words = {lang.iso1: f"__{lang.iso3}__" for lang in languages.LANGUAGES if lang.iso3 in supported}
        words.update({code: f"__{code}__" for code in supported})
        return words

    # ---- batches ------------------------------------------------------------------------------------
    def batch_key(self, item: Stimulus) -> Any:
        # Target languages may differ within a batch (the prompt is per-row decoder_input_ids); encoders may not.
        return "speech" if item.has_audio else "text"

    def prepare(self, items: Sequence[Stimulus], audio: Sequence[np.ndarray | None],
                prompts: Sequence[Prompt]) -> Prepared:
        kinds = {it.has_audio for it in items}
        if len(kinds) > 1:
            raise UserError("SeamlessM4T v2 takes speech and text through different encoders; one batch cannot "
                            "mix them (use Session.batches).")
        tok = self.tokenizer
        targets = [self.target_language(it) for it in items]
        prompt_ids = torch.tensor([[self.model.config.decoder_start_token_id, self.target_languages[t]]
                                   for t in targets])
        rows: list[dict[str, Positions]] = []
        if items[0].has_audio:
            fe = self.processor.feature_extractor
            enc = fe([a for a in audio], sampling_rate=self.sample_rate, return_tensors="pt", padding=True)
            inputs: dict[str, Any] = {"input_features": enc["input_features"],
                                      "attention_mask": enc["attention_mask"].long()}
            for b in range(len(items)):
                frames = int(enc["attention_mask"][b].sum())
                memory = Positions(0, self._adaptor_length(frames))
                rows.append({"speech_encoder": Positions(0, frames), "speech_adaptor": memory,
                             "cross_kv": memory})
        else:
            for it in items:
                if not it.text:
                    raise UserError(f"Item '{it.id}' has neither audio nor text.")
            encoded = [tok(it.text, src_lang=self.source_language(it)) for it in items]
            enc = tok.pad(encoded, padding=True, return_tensors="pt")
            inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
            for offset, length in valid_ranges(enc["attention_mask"]):  # __src__ text </s>
                pos = Positions(offset, length, {"text": (1, length - 1)} if length > 2 else {})
                rows.append({"text_encoder": pos, "cross_kv": pos})
        for b, row in enumerate(rows):
            row["text_decoder"] = Positions(0, prompt_ids.shape[1])
        inputs["decoder_input_ids"] = prompt_ids
        return Prepared(inputs, rows, {**inputs, "generate_speech": False})

    def _adaptor_length(self, frames: int) -> int:
        """Frames after the length adaptor, as ``SeamlessM4Tv2ConformerAdapterLayer`` computes them."""
        cfg = self.model.config
        if not cfg.add_adapter:
            return frames
        k, s = cfg.adaptor_kernel_size, cfg.adaptor_stride
        for _ in range(cfg.num_adapter_layers):
            frames = math.floor((frames + 2 * (k // 2) - k) / s + 1)
        return frames

    # ---- decoding -----------------------------------------------------------------------------------
    def decode_outputs(self, sequences: torch.Tensor, prepared: Prepared) -> list[dict[str, Any]]:
        """``generate`` keeps the ``[</s>, __tgt__]`` prompt at the front of each sequence; strip it."""
        prompt = prepared.inputs["decoder_input_ids"]
        codes = {i: code for code, i in self.target_languages.items()}
        texts = self.tokenizer.batch_decode(sequences[:, prompt.shape[1]:], skip_special_tokens=True)
        return [{"output": t.strip(), "language": codes.get(int(p[1]))} for t, p in zip(texts, prompt)]

    def target_ids(self, text: str) -> list[int]:
        """Token ids of a target text without ``</s>`` or language tokens (what follows the decoder prompt)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def _mask_adaptor_padding(model: torch.nn.Module) -> None:
    """Zero padded encoder frames where the length adaptor's strided convolutions would mix them into valid ones.

    ``SeamlessM4Tv2ConformerAdapterLayer`` layer-normalises the encoder output and convolves it (kernel 8, stride
    8, padding 4) without masking, so the last valid adaptor frame of a padded row sees padded frames, which are
    not zero after the encoder's layer norms: the same clip gives different adaptor outputs (and decoder states,
    ~1e-2 on the tiny model) alone and in a batch. Masking the two layer-norm outputs to zero beyond each row's
    valid frames makes a padded row equal to the clip run alone; a row without padding is unchanged.
    """
    adapter = getattr(model.speech_encoder, "adapter", None)
    if adapter is None or getattr(adapter, "_probe_masked", False):
        return
    adapter._probe_masked = True
    for layer in adapter.layers:
        state: dict[str, Any] = {}

        def remember(_mod: Any, args: tuple, kwargs: dict, state: dict = state) -> None:
            state["mask"] = args[1] if len(args) > 1 else kwargs.get("attention_mask")

        def forget(_mod: Any, _args: Any, _out: Any, state: dict = state) -> None:
            state.pop("mask", None)

        def zero_padding(_mod: Any, _args: Any, out: torch.Tensor, state: dict = state) -> torch.Tensor:
            mask = state.get("mask")
            if mask is None or mask.dim() != 2 or mask.shape[1] != out.shape[1] or bool(mask.all()):
                return out
            return out.masked_fill(~mask.bool()[..., None], 0.0)

        layer.register_forward_pre_hook(remember, with_kwargs=True)
        layer.register_forward_hook(forget)
        for norm in (layer.residual_layer_norm, layer.self_attn_layer_norm):
            norm.register_forward_hook(zero_padding)


@hookimpl
def lalm_probe_models() -> list[type]:
    return [SeamlessM4Tv2]
