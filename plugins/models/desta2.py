"""DeSTA2 (``DeSTA-ntu/DeSTA2-8B-beta``): Whisper, its transcription and a Q-Former connector feeding Llama 3 8B
Instruct, written here on transformers parts (:mod:`.arch.desta2`) with the release's names.

Sources: a hub id or a local checkpoint directory (``config.json`` + ``qformer_connector.pth``); the base models come
from the ids it names (``whisper_model_id``, ``llama_model_id``), from ``<dir>/<id>`` folders inside a local
checkpoint, or from the options ``whisper_model`` / ``llama_model``. ``tiny`` is the seeded tiny release of
:func:`~.arch.desta2_io.build_tiny_desta2` laid out as one such folder. ``trust_remote_code`` is not offered: the
release's code downloads both base models by id in its constructors (no local copies, no offline use) and does not
run on transformers 5.

The prompt is the release's two-stage one: Whisper (inside the model) transcribes each clip first, outside any
trace; the chat text (system, the audio turn, the user's instruction; option ``system``, by default the README's
example, empty for none) gets the transcription after the audio and
the 64 connector outputs at the release's ``audio_position``. LM spans: ``audio`` (the 64 slots), ``transcription``
and ``text``. The slots hold the tokenizer's EOS id, which can occur elsewhere in a prompt (Llama 3's ``<|eot_id|>``
closes every turn), so ``probe check`` does not count them: the plugin's tests check the span against
``audio_token_start_idx``. Outputs carry the transcription next to the answer.
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
from lalm_probe.plugins.models.arch.desta2_io import DEFAULT_SYSTEM, build_tiny_desta2, load_desta2
from lalm_probe.plugins.models.arch.layout import lm_positions, user_text
from lalm_probe.plugins.models.arch.tiny import release_folder


def build_tiny(out_dir: Path) -> None:
    """The arch's seeded tiny DeSTA2 as one folder, with its base models in ``tiny/whisper`` and ``tiny/llama``."""
    paths, _ = build_tiny_desta2(Path(out_dir) / ".parts")
    release_folder(out_dir, paths, "desta2", {"whisper": "tiny/whisper", "llama": "tiny/llama"})
    shutil.rmtree(Path(out_dir) / ".parts")


class Desta2(ModelPlugin):
    name = "desta2"
    description = "DeSTA2: Whisper + transcription + Q-Former connector + Llama 3 8B Instruct (rebuilt, no remote code)"
    default_checkpoint = "DeSTA-ntu/DeSTA2-8B-beta"
    hub_ids = ("DeSTA-ntu/DeSTA2-8B-beta",)
    tiny = build_tiny
    lens_stack = "lm"
    option_defaults = {"whisper_model": None, "llama_model": None, "system": DEFAULT_SYSTEM}
    option_help = {
        "whisper_model": "the Whisper weights (hub id or folder; default: the release's)",
        "llama_model": "the Llama 3 weights (hub id or folder; default: the release's)",
        "system": "the system prompt",
    }
    load_options = ("whisper_model", "llama_model")
    stacks = (
        # The connector's Q-Former runs once per selected encoder layer in one forward pass, so its layers are not
        # sites; its output (64 prompts per clip, in the LM's width) is.
        Stack("audio_encoder", layers=("speech_perception.whisper.model.encoder.layers",), components=bart_layer(),
              final_norm=("speech_perception.whisper.model.encoder.layer_norm",),
              extras={"connector": Component("speech_perception.connector", width=lambda m: m.proj[1].out_features,
                                             positions="audio_prompts")}),
        Stack("lm", layers=("llama.model.layers",), runs="per_step", components=decoder_layer(),
              final_norm=("llama.model.norm",), unembed=("llama.lm_head",), hidden_states="hidden_states"),
    )

    @classmethod
    def load_weights(cls, source: str | Path, *, device: str, dtype: str, device_map: str | None,
                     whisper_model: str | None = None, llama_model: str | None = None) -> tuple[torch.nn.Module, Any]:
        return load_desta2(source, dtype=torch_dtype(dtype), device=device, device_map=device_map,
                           whisper_model=whisper_model, llama_model=llama_model)

    def max_seconds(self) -> float:
        fe = self.processor.whisper_processor.feature_extractor  # Whisper's features cover one window
        return fe.n_samples / fe.sampling_rate

    def prepare(self, items: Sequence[Stimulus], audio: Sequence[np.ndarray | None],
                prompts: Sequence[Prompt]) -> Prepared:
        proc = self.processor
        clips = [a for a in audio if a is not None]
        said = iter(proc.transcribe(self.model, proc.features(clips, self.sample_rate)) if clips else [])
        transcriptions = [next(said) if a is not None else None for a in audio]
        users = [user_text(it, p) for it, p in zip(items, prompts)]
        system = self.options["system"] or None
        batch = proc([proc.messages(u, audio=it.has_audio, system=system) for it, u in zip(items, users)], list(audio),
                     transcriptions, sampling_rate=self.sample_rate, user_texts=users,
                     assistant_prefixes=[p.assistant_prefix for p in prompts])
        rows = []
        for row in batch.rows:
            out = {"lm": lm_positions(row)}
            if row.clip is not None:
                out["audio_encoder"] = Positions(0, row.audio_frames, row=row.clip)
                out["audio_prompts"] = Positions(0, row.audio[1] - row.audio[0], row=row.clip)
            rows.append(out)
        return Prepared(batch.inputs, rows, meta={"transcriptions": transcriptions})

    def decode_outputs(self, sequences: torch.Tensor, prepared: Prepared) -> list[dict[str, Any]]:
        outputs = super().decode_outputs(sequences, prepared)
        for out, said in zip(outputs, prepared.meta.get("transcriptions", [])):
            if said is not None:
                out["transcription"] = said.strip()
        return outputs


@hookimpl
def lalm_probe_models() -> list[type]:
    return [Desta2]
