"""The tracer reads modules by their torch paths, including BERT's `output` submodules that nnsight renames."""

from __future__ import annotations

import warnings

import torch
from lalm_probe.core.tracing import Op, Tracer
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertLayer


class OneBertLayer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        cfg = BertConfig(hidden_size=16, num_attention_heads=2, intermediate_size=32)
        cfg._attn_implementation = "eager"
        self.layer = BertLayer(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def test_a_path_through_a_submodule_named_output_reads_that_submodule_without_a_warning():
    """nnsight serves `.output` as every module's output and mounts a submodule of that name as `.E_output`; the
    plugin's path `layer.output.dense` still means the torch module `layer.output.dense`."""
    model = OneBertLayer().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tracer = Tracer(model)
    seen = {}
    hook = model.layer.output.dense.register_forward_hook(lambda _m, _a, out: seen.setdefault("dense", out))
    values = tracer.run({"x": torch.randn(2, 3, 16)}, [Op("layer.output.dense", "read", lambda v, _s: v, key="d")])
    hook.remove()
    assert torch.equal(values["d"], seen["dense"])
