"""Ultravox 0.5 (``fixie-ai/ultravox-v0_5-llama-3_2-1b`` / ``-llama-3_1-8b``): Whisper encoder, frame-stacking
projector and Llama 3.x, written here on transformers parts (:mod:`.arch.ultravox`) with the release's names.

Sources: a hub id or a local checkpoint directory (``config.json`` + the trained encoder and projector); its base
models come from the ids it names (``audio_model_id``, ``text_model_id``), from ``<dir>/<id>`` folders inside a local
checkpoint, or from the options ``audio_model`` / ``text_model`` (a hub id or a directory). ``tiny`` is the seeded
tiny release of :func:`~.arch.ultravox_io.build_tiny_ultravox` laid out as one such folder. ``trust_remote_code``
is not offered: the release's code targets transformers 4.x and does not load on transformers 5 (the option exists
only to say so).

The prompt is the release pipeline's: the user turn is the instruction with `` <|audio|>`` appended, rendered by the
Llama 3 chat template; the placeholder becomes ``ceil(mel frames / 16)`` copies of EOS, overwritten by the projector
output. That id (Llama 3's ``<|eot_id|>``) also closes every turn, so ``probe check`` cannot count them: the plugin's
tests check the span against ``audio_token_start_idx`` instead. Audio longer than one window (30 s) is encoded in
window chunks; the ``audio_encoder`` sites read the first chunk.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from lalm_probe.core.data import Stimulus
from lalm_probe.core.model import ModelPlugin, Prepared, Prompt, torch_dtype
from lalm_probe.core.positions import Positions
from lalm_probe.core.registry import hookimpl
from lalm_probe.core.stacks import Stack
from lalm_probe.core.templates import bart_layer, decoder_layer
from lalm_probe.core.vocab import Component
from lalm_probe.plugins.models.arch.layout import lm_positions, user_text
from lalm_probe.plugins.models.arch.tiny import release_folder
from lalm_probe.plugins.models.arch.ultravox_io import build_tiny_ultravox, load_ultravox


def build_tiny(out_dir: Path) -> None:
    """The arch's seeded tiny Ultravox as one folder, with its base models in ``tiny/whisper`` and ``tiny/llama``."""
    paths, _ = build_tiny_ultravox(Path(out_dir) / ".parts")
    release_folder(out_dir, paths, "ultravox", {"whisper": "tiny/whisper", "llama": "tiny/llama"})
    shutil.rmtree(Path(out_dir) / ".parts")


class Ultravox(ModelPlugin):
    name = "ultravox"
    description = "Ultravox 0.5: Whisper encoder + stacking projector + Llama 3.x (rebuilt, no remote code)"
    default_checkpoint = "fixie-ai/ultravox-v0_5-llama-3_2-1b"
    hub_ids = ("fixie-ai/ultravox-v0_5-llama-3_2-1b", "fixie-ai/ultravox-v0_5-llama-3_1-8b")
    tiny = build_tiny
    lens_stack = "lm"
    # chat_template=false: no template, the input's own last token is last (seed 000), as AudioLM models take it
    option_defaults = {"audio_model": None, "text_model": None, "trust_remote_code": False, "chat_template": True}
    option_help = {
        "audio_model": "the Whisper encoder's weights (default: the checkpoint's audio_model_id)",
        "text_model": "the Llama weights (default: the checkpoint's text_model_id)",
        "trust_remote_code": "refused: the model is rebuilt here",
        "chat_template": "false: the input without the chat template",
    }
    load_options = ("audio_model", "text_model", "trust_remote_code")
    stacks = (
        # The projector stacks 8 encoder frames per LM token: it is read on those tokens, one per audio position.
        Stack("audio_encoder", layers=("audio_tower.layers",), components=bart_layer(),
              final_norm=("audio_tower.layer_norm",),
              extras={"projector": Component("multi_modal_projector", width=lambda m: m.linear_2.out_features,
                                             positions="audio_stacked")}),
        Stack("lm", layers=("language_model.model.layers",), runs="per_step", components=decoder_layer(),
              final_norm=("language_model.model.norm",), unembed=("language_model.lm_head",),
              hidden_states="hidden_states"),
    )

    @classmethod
    def load_weights(cls, source: str | Path, *, device: str, dtype: str, device_map: str | None,
                     audio_model: str | None = None, text_model: str | None = None,
                     trust_remote_code: bool = False) -> tuple[torch.nn.Module, Any]:
        return load_ultravox(source, dtype=torch_dtype(dtype), device=device, device_map=device_map,
                             audio_model=audio_model, text_model=text_model, trust_remote_code=trust_remote_code)

    def prepare(self, items: Sequence[Stimulus], audio: Sequence[np.ndarray | None],
                prompts: Sequence[Prompt]) -> Prepared:
        proc = self.processor
        users = [user_text(it, p) for it, p in zip(items, prompts)]
        texts = [proc.render(u, audio=it.has_audio, assistant_prefix=p.assistant_prefix,
                             chat_template=self.options["chat_template"])
                 for it, p, u in zip(items, prompts, users)]
        batch = proc(texts, list(audio), sampling_rate=self.sample_rate, user_texts=users)
        rows = []
        for row in batch.rows:
            out = {"lm": lm_positions(row)}
            if row.clip is not None:  # the row's first chunk on the encoder; its tokens after stacking
                mel = int(batch.inputs["audio_lens"][row.clip])
                out["audio_encoder"] = Positions(0, (mel - 1) // 2 + 1, row=row.clip)
                out["audio_stacked"] = Positions(0, int(batch.inputs["audio_token_len"][row.clip]), row=row.clip)
            rows.append(out)
        return Prepared(batch.inputs, rows)


@hookimpl
def lalm_probe_models() -> list[type]:
    return [Ultravox]
