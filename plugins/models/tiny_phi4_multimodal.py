"""A seeded tiny ``Phi4MultimodalForCausalLM`` with its offline processor parts and a speech LoRA, laid out as the
released checkpoint is: the base weights, the tokenizer, the feature extractor and the chat template at the top,
the speech adapter in ``speech-lora/`` (peft's ``adapter_config.json`` and ``adapter_model.safetensors``)."""

from __future__ import annotations

from pathlib import Path

import torch

# The processor's chat template (the released one's format): ``<|role|>content<|end|>`` per turn, ``<|audio|>`` per
# clip (the processor then repeats it once per audio embedding), ``<|assistant|>`` to generate.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}{{- '<|' + message['role'] + '|>' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}{%- else -%}"
    "{%- for part in message['content'] -%}{%- if part['type'] == 'audio' -%}{{- '<|audio|>' -}}"
    "{%- elif part['type'] == 'image' -%}{{- '<|image|>' -}}{%- elif part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}{{- '<|end|>' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- else -%}{{- eos_token -}}{%- endif -%}"
)
# The released speech LoRA adapts these projections of every LM layer (r=320, alpha=640: scaling 2, kept here).
LORA_TARGETS = r"model\.layers\.\d+\.(self_attn\.(qkv|o)_proj|mlp\.(gate_up|down)_proj)"


def tokenizer() -> "object":
    """A byte-level GPT-2 tokenizer (one token per byte) with Phi-4's named placeholders and turn tokens."""
    from tokenizers import pre_tokenizers
    from transformers import GPT2Tokenizer

    vocab = {"<|endoftext|>": 0}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(ch, len(vocab))
    tok = GPT2Tokenizer(vocab=vocab, merges=[], unk_token="<|endoftext|>", bos_token="<|endoftext|>",
                        eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                        extra_special_tokens={"image_token": "<|image|>", "audio_token": "<|audio|>"})
    tok.add_special_tokens({"additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]})
    return tok


def build_tiny(out_dir: Path) -> None:
    """4 LM layers (64 wide), a 2-block, 32-wide Conformer, a rank-4 speech LoRA; seeded so every build is
    identical. The encoder's weights are drawn 10x wider than transformers' default and its biases and input
    normalisation at random, as in trained weights, so the padding checks see what real checkpoints do (small
    weights and zero biases would hide leaks through padded frames)."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import save_file
    from transformers import Phi4MultimodalConfig, Phi4MultimodalFeatureExtractor, Phi4MultimodalForCausalLM

    tok = tokenizer()
    end = tok.convert_tokens_to_ids("<|end|>")
    cfg = Phi4MultimodalConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, original_max_position_embeddings=256,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                         "short_factor": [1.0] * 6, "long_factor": [1.5] * 6},
        pad_token_id=0, bos_token_id=0, eos_token_id=[0, end], tie_word_embeddings=True,
        audio_config=dict(hidden_size=32, intermediate_size=64, num_blocks=2, num_attention_heads=4, kernel_size=3,
                          ext_pw_out_channel=32, depthwise_separable_out_channel=32, nemo_conv_channels=16,
                          bias_max_distance=50, audio_token_id=tok.audio_token_id, initializer_range=0.2),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14, crop_size=28, image_token_id=tok.image_token_id))
    torch.manual_seed(0)
    model = Phi4MultimodalForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith((".bias", ".b1", ".b2", "global_mean")):
                tensor.normal_(0.0, 0.1)
            elif name.endswith("global_invstd"):
                tensor.uniform_(0.5, 1.5)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    Phi4MultimodalFeatureExtractor().save_pretrained(out_dir)
    (Path(out_dir) / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    # init_lora_weights=False draws B at random too (peft's default zeros it, which would make the adapter a no-op)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.01, target_modules=LORA_TARGETS, init_lora_weights=False,
                      task_type="CAUSAL_LM")
    inject_adapter_in_model(lora, model, adapter_name="speech")
    adapter = Path(out_dir) / "speech-lora"
    adapter.mkdir()
    lora.save_pretrained(adapter)
    save_file(get_peft_model_state_dict(model, adapter_name="speech"), adapter / "adapter_model.safetensors")
