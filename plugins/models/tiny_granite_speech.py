"""A seeded tiny Granite Speech (``GraniteSpeechForConditionalGeneration``) with an offline processor and a LoRA.

The tokenizer is a byte-level GPT-2 BPE with Granite's role and audio tokens and a chat template in Granite's
format (``<|start_of_role|>user<|end_of_role|>...<|end_of_text|>``, without the dated system prompt the released
template adds). Like the released checkpoints, the model has ``has_lora_adapter=True`` and ships a LoRA on the LM's
``q_proj``/``v_proj`` in PEFT's files (``adapter_config.json``, ``adapter_model.safetensors``, keys under
``base_model.model.language_model.model.layers.<i>``), with random non-zero A and B so the adapter changes the
output. The encoder attends in 32-frame blocks (200 on the real model), so short test clips span several blocks.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from lalm_probe.core.tiny import byte_level_tokenizer
from lalm_probe.plugins.models.melspec import install

FE_MODULE = "transformers.models.granite_speech.feature_extraction_granite_speech"
SPECIALS = ["<|start_of_role|>", "<|end_of_role|>", "<|audio|>"]
CHAT_TEMPLATE = ("{%- for message in messages %}<|start_of_role|>{{ message['role'] }}<|end_of_role|>"
                 "{{ message['content'] }}<|end_of_text|>\n{% endfor %}"
                 "{%- if add_generation_prompt %}<|start_of_role|>assistant<|end_of_role|>{%- endif %}")
LORA = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0,
        "bias": "none", "task_type": "CAUSAL_LM", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False}


def build_tiny(out_dir: Path) -> None:
    """2 Conformer + 2 Q-Former + 4 Granite LM layers, 64 wide, the real processor, a LoRA; seeded."""
    install(FE_MODULE)
    from safetensors.torch import save_file
    from transformers import (
        GPT2Tokenizer,
        GraniteSpeechConfig,
        GraniteSpeechFeatureExtractor,
        GraniteSpeechForConditionalGeneration,
        GraniteSpeechProcessor,
    )

    out_dir = Path(out_dir)
    tok = byte_level_tokenizer(GPT2Tokenizer, SPECIALS, pad="<|end_of_text|>")
    tok.chat_template = CHAT_TEMPLATE
    processor = GraniteSpeechProcessor(audio_processor=GraniteSpeechFeatureExtractor(), tokenizer=tok,
                                       chat_template=CHAT_TEMPLATE)
    eos = tok.convert_tokens_to_ids("<|end_of_text|>")
    cfg = GraniteSpeechConfig(
        encoder_config=dict(input_dim=160, num_layers=2, hidden_dim=64, feedforward_mult=2, num_heads=4, dim_head=16,
                            output_dim=42, context_size=32, max_pos_emb=64, conv_kernel_size=15, dropout=0.0),
        projector_config=dict(model_type="blip_2_qformer", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=128, encoder_hidden_size=64, cross_attention_frequency=1,
                              max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
        text_config=dict(model_type="granite", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, pad_token_id=eos, bos_token_id=eos, eos_token_id=eos),
        audio_token_index=tok.convert_tokens_to_ids("<|audio|>"), window_size=15, downsample_rate=5,
        has_lora_adapter=True)
    torch.manual_seed(0)
    logging.getLogger("transformers.models.granite_speech.modeling_granite_speech").setLevel(logging.ERROR)
    model = GraniteSpeechForConditionalGeneration(cfg).eval()  # (it warns that peft is missing: the LoRA is below)
    model.generation_config.pad_token_id = model.generation_config.eos_token_id = eos
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    g = torch.Generator().manual_seed(1)
    weights = {}
    for i, layer in enumerate(model.model.language_model.layers):
        for proj in LORA["target_modules"]:
            base = layer.self_attn.get_submodule(proj)
            key = f"base_model.model.language_model.model.layers.{i}.self_attn.{proj}"
            weights[f"{key}.lora_A.weight"] = torch.randn(LORA["r"], base.in_features, generator=g) * 0.2
            weights[f"{key}.lora_B.weight"] = torch.randn(base.out_features, LORA["r"], generator=g) * 0.2
    save_file(weights, str(out_dir / "adapter_model.safetensors"))
    (out_dir / "adapter_config.json").write_text(json.dumps({**LORA, "base_model_name_or_path": str(out_dir)}))
