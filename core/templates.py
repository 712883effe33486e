"""Templates for the common layer shapes: the canonical components of one layer, by module name.

A plugin declares ``components=decoder_layer()`` for a Llama/Qwen2-style layer instead of listing paths; arguments
rename the modules where a family differs. Each template returns ``{component: Component}`` in the canonical
vocabulary (:mod:`~lalm_probe.core.vocab`), including the width rules of composite modules (a block's output has
the width of its first norm, an attention module that of its output projection).
"""

from __future__ import annotations

from dataclasses import replace

from .vocab import Component


def _attention(prefix: str, module: str, q: str, k: str, v: str, o: str, kv: bool = True) -> dict[str, Component]:
    out = {f"{prefix}_q": Component(f"{module}.{q}")}
    if kv:
        out.update({f"{prefix}_k": Component(f"{module}.{k}"), f"{prefix}_v": Component(f"{module}.{v}")})
    out[f"{prefix}_o"] = Component(f"{module}.{o}")
    out[prefix] = Component(module, width=f"{prefix}_o")
    return out


def _feed_forward(prefix: str, norm: str, up: str, down: str, module: str | None,
                  gate: str | None = None) -> dict[str, Component]:
    """``up``/``down``/``gate`` are paths relative to the layer; ``module`` is the whole block when it is one."""
    out = {f"{prefix}_norm": Component(norm)}
    if gate:
        out[f"{prefix}_gate"] = Component(gate)
    out.update({f"{prefix}_up": Component(up), f"{prefix}_act": Component(down, io="input"),
                f"{prefix}_down": Component(down)})
    # Without a module of its own (Whisper's fc1/fc2 sit on the layer), the block's output is the down projection's.
    out[prefix] = Component(module or down, width=f"{prefix}_down")
    return out


def decoder_layer(*, attn: str = "self_attn", mlp: str = "mlp", attn_norm: str = "input_layernorm",
                  mlp_norm: str = "post_attention_layernorm", q: str = "q_proj", k: str = "k_proj",
                  v: str = "v_proj", o: str = "o_proj", gate: str | None = "gate_proj", up: str = "up_proj",
                  down: str = "down_proj", attn_post_norm: str | None = None,
                  mlp_post_norm: str | None = None) -> dict[str, Component]:
    """A Llama / Qwen2 / Mistral / Gemma-style pre-norm decoder layer with a (gated) MLP."""
    comps = {"out": Component("", width="attn_norm"), "attn_norm": Component(attn_norm),
             **_attention("attn", attn, q, k, v, o),
             **_feed_forward("mlp", mlp_norm, f"{mlp}.{up}", f"{mlp}.{down}", mlp, f"{mlp}.{gate}" if gate else None)}
    if attn_post_norm:
        comps["attn_post_norm"] = Component(attn_post_norm)
    if mlp_post_norm:
        comps["mlp_post_norm"] = Component(mlp_post_norm)
    return comps


def bart_layer(*, cross: str | None = None, attn: str = "self_attn", attn_norm: str = "self_attn_layer_norm",
               q: str = "q_proj", k: str = "k_proj", v: str = "v_proj", o: str = "out_proj",
               cross_norm: str = "encoder_attn_layer_norm", mlp_norm: str = "final_layer_norm", fc1: str = "fc1",
               fc2: str = "fc2", mlp: str | None = None, layout: str = "time_major",
               act: str = "activation_fn") -> dict[str, Component]:
    """A Whisper / BART / NLLB-style pre-norm encoder layer, or decoder layer when ``cross`` names its
    cross-attention module. Cross-attention keys and values run on the source time axis, so they are not here:
    declare them as their own stack with :func:`cross_kv_layer`.

    ``layout``: how every module of the layer lays out its output (``packed`` for the Qwen-Omni audio towers, see
    :mod:`~lalm_probe.core.taps`). A tap reads outputs, so ``mlp_act`` is then the output of the activation module
    ``act`` (equal to the input of ``fc2``: no dropout at inference) instead of ``fc2``'s input."""
    comps = {"out": Component("", width="attn_norm"), "attn_norm": Component(attn_norm),
             **_attention("attn", attn, q, k, v, o)}
    if cross:
        comps["cross_norm"] = Component(cross_norm)
        comps.update(_attention("cross", cross, q, k, v, o, kv=False))
    comps.update(_feed_forward("mlp", mlp_norm, fc1, fc2, mlp))
    if layout != "time_major":
        comps = {name: replace(c, layout=layout) for name, c in comps.items()}
        comps["mlp_act"] = Component(act, layout=layout, width="mlp_up")
    return comps


def cross_kv_layer(cross: str = "encoder_attn", k: str = "k_proj", v: str = "v_proj") -> dict[str, Component]:
    """Cross-attention keys and values: projections of the encoder output, read on its positions."""
    return {"cross_k": Component(f"{cross}.{k}"), "cross_v": Component(f"{cross}.{v}")}


def conformer_layer(*, ffn1: str = "ffn1", ffn1_norm: str = "ffn1_layer_norm", ffn2: str = "ffn2",
                    ffn2_norm: str = "ffn2_layer_norm", up: str = "intermediate_dense", down: str = "output_dense",
                    attn: str = "self_attn", attn_norm: str = "self_attn_layer_norm", q: str = "linear_q",
                    k: str = "linear_k", v: str = "linear_v", o: str = "linear_out", conv: str = "conv_module",
                    conv_norm: str = "layer_norm", pw1: str = "pointwise_conv1", glu: str = "glu",
                    dw: str = "depthwise_conv", dw_norm: str = "depthwise_layer_norm", pw2: str = "pointwise_conv2",
                    final_norm: str = "final_layer_norm") -> dict[str, Component]:
    """A Conformer layer (macaron feed-forward, self-attention, convolution module, feed-forward, final norm),
    with SeamlessM4T v2 / wav2vec2-BERT module names by default. The second feed-forward module is ``mlp_*``, the
    first ``ffn1_*``; the channel-first convolution outputs are read time-major through taps."""
    return {
        "out": Component("", width="final_norm"),
        **_feed_forward("ffn1", ffn1_norm, f"{ffn1}.{up}", f"{ffn1}.{down}", ffn1),
        "attn_norm": Component(attn_norm), **_attention("attn", attn, q, k, v, o),
        "conv_norm": Component(f"{conv}.{conv_norm}"),
        "conv_pw1": Component(f"{conv}.{pw1}", layout="channels_first"),
        "conv_glu": Component(f"{conv}.{glu}", layout="channels_first", width="conv_dw"),
        "conv_dw": Component(f"{conv}.{dw}", layout="channels_first"),
        "conv_dw_norm": Component(f"{conv}.{dw_norm}"),
        "conv_pw2": Component(f"{conv}.{pw2}", layout="channels_first"),
        "conv": Component(conv, width="conv_pw2"),
        **_feed_forward("mlp", ffn2_norm, f"{ffn2}.{up}", f"{ffn2}.{down}", ffn2),
        "final_norm": Component(final_norm),
    }
