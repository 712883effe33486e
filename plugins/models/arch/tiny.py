"""Pieces of tiny, seeded stand-ins for the released base models: byte-level tokenizers and a 2 s-window Whisper.

Tokenizers have one token per byte (no merges), so they never produce an unknown token and need no files; a
Llama-style one adds its BOS through a template post-processor exactly where a Llama 3 tokenizer does.
"""

from __future__ import annotations

from typing import Sequence

import torch

# The Llama 3 Instruct chat format (``meta-llama/Meta-Llama-3-8B-Instruct`` tokenizer_config.json renders the same
# text; Llama 3.1/3.2 templates add a dated system header, which real checkpoints carry in their own template).
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def byte_tokenizer(specials: Sequence[str], *, eos: str, bos: str | None = None, pad: str | None = None,
                   unk: str | None = None, add_bos: bool = False, chat_template: str | None = None):
    """A fast byte-level BPE tokenizer without merges; ``specials`` follow the 256 byte symbols in order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(specials))
    if add_bos and bos is not None:
        bos_id = backend.token_to_id(bos)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=pad,
                                  unk_token=unk)
    if chat_template:
        tok.chat_template = chat_template
    return tok


def tiny_whisper(num_mel_bins: int, *, seed: int, d_model: int = 64, layers: int = 2, window_s: int = 2,
                 max_target: int = 64, max_length: int = 24):
    """A seeded ``WhisperForConditionalGeneration`` with the real special-token layout and a ``window_s`` window,
    plus its ``WhisperProcessor`` (feature extractor padding to the same window); ``max_target`` decoder positions,
    generation capped at ``max_length`` tokens."""
    from tokenizers import pre_tokenizers
    from transformers import (
        AddedToken,
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    specials = (["<|endoftext|>", "<|startoftranscript|>"] + [f"<|{lang}|>" for lang in LANGUAGES]
                + ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>",
                   "<|notimestamps|>"])
    vocab: dict[str, int] = {}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(ch, len(vocab))
    vocab.update({s: len(vocab) + i for i, s in enumerate(specials)})
    tok = WhisperTokenizer(vocab=vocab, merges=[], unk_token="<|endoftext|>", bos_token="<|endoftext|>",
                           eos_token="<|endoftext|>", pad_token="<|endoftext|>", additional_special_tokens=specials[2:])
    tok.add_tokens([AddedToken(f"<|{i * 0.02:.2f}|>", special=False, normalized=False) for i in range(101)])
    fe = WhisperFeatureExtractor(feature_size=num_mel_bins, chunk_length=window_s, sampling_rate=16000)
    ids = tok.convert_tokens_to_ids
    eot, sot = ids("<|endoftext|>"), ids("<|startoftranscript|>")
    cfg = WhisperConfig(vocab_size=len(tok), num_mel_bins=num_mel_bins, d_model=d_model, encoder_layers=layers,
                        decoder_layers=layers, encoder_attention_heads=4, decoder_attention_heads=4,
                        encoder_ffn_dim=2 * d_model, decoder_ffn_dim=2 * d_model,
                        max_source_positions=50 * window_s, max_target_positions=max_target, pad_token_id=eot,
                        bos_token_id=eot, eos_token_id=eot, decoder_start_token_id=sot)
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(cfg).eval()
    gen = GenerationConfig(
        decoder_start_token_id=sot, eos_token_id=eot, pad_token_id=eot, bos_token_id=eot, max_length=max_length,
        is_multilingual=True, lang_to_id={f"<|{lang}|>": ids(f"<|{lang}|>") for lang in LANGUAGES},
        task_to_id={"transcribe": ids("<|transcribe|>"), "translate": ids("<|translate|>")},
        no_timestamps_token_id=ids("<|notimestamps|>"), prev_sot_token_id=ids("<|startofprev|>"),
        begin_suppress_tokens=[eot], suppress_tokens=[], max_initial_timestamp_index=50, alignment_heads=[[1, 0]])
    gen._from_model_config = False
    model.generation_config = gen
    return model, WhisperProcessor(feature_extractor=fe, tokenizer=tok)


def tiny_llama(vocab_size: int, *, seed: int, hidden: int = 64, layers: int = 2, tie: bool = False,
               bos: int | None = None, eos: int | None = None, pad: int | None = None):
    """A seeded 2-layer, 64-wide ``LlamaForCausalLM``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, tie_word_embeddings=tie, bos_token_id=bos, eos_token_id=eos,
                      pad_token_id=pad)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def release_folder(out_dir, paths: dict, top: str, parts: dict[str, str]) -> None:
    """Lay a tiny build out as one local release folder: the files of ``paths[top]`` at ``out_dir``, each base model
    ``paths[name]`` in the folder its hub id ``parts[name]`` names (what ``sources.base_model_source`` finds)."""
    import shutil
    from pathlib import Path

    out_dir = Path(out_dir)
    for item in Path(paths[top]).iterdir():
        shutil.move(str(item), out_dir / item.name)
    for name, model_id in parts.items():
        (out_dir / model_id).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(paths[name]), out_dir / model_id)
