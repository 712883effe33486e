"""The model view's lens and final norm against the model's own outputs (HF ``hidden_states`` and logits)."""

from __future__ import annotations

import numpy as np
import torch
from helpers import SR, tone
from lalm_probe.core.data import Stimulus


def _reference(session):
    items = [Stimulus(f"v{i}", audio=tone(180 + 60 * i, 0.3 + 0.1 * i), sample_rate=SR, prompt="Hi?") for i in range(2)]
    prepared = session.prepare(items)
    with torch.no_grad():
        out = session.plugin.model(**prepared.inputs, output_hidden_states=True)
    last = torch.tensor([r["lm"].offset + r["lm"].length - 1 for r in prepared.rows])
    rows = torch.arange(len(items))
    mine = session.run(items, ["lm.7.out", "lm.3.out"], ["last"])
    return out, rows, last, mine


def test_the_last_layer_under_norm_false_is_the_models_own_readout(qwen_session):
    """Semantic-hub lens (norm=false): the last layer keeps the final norm, so it reproduces the model's logits;
    a layer before it is unembedded raw. Without ``layer=`` (the old lens) the last layer was 0.4 off."""
    out, rows, last, mine = _reference(qwen_session)
    view, h = qwen_session.view, mine["lm.7.out@last"]
    logits = out.logits[rows, last]
    torch.testing.assert_close(view.lens(h, "lm", norm=False, layer=7), logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(view.lens(h, "lm", norm=False, layer=-1), logits, rtol=1e-4, atol=1e-4)
    assert (view.lens(h, "lm", norm=False) - logits).abs().max() > 0.05  # what skipping the norm gave
    h3 = mine["lm.3.out@last"]
    torch.testing.assert_close(view.lens(h3, "lm", norm=False, layer=3), qwen_session.plugin.model.lm_head(h3))


def test_final_norm_gives_hf_hidden_states_last_entry(qwen_session):
    out, rows, last, mine = _reference(qwen_session)
    normed = qwen_session.view.final_norm(mine["lm.7.out@last"], "lm")
    np.testing.assert_allclose(normed, out.hidden_states[-1][rows, last].double().numpy(), rtol=1e-4, atol=1e-5)
    assert not np.allclose(normed, mine["lm.7.out@last"].double().numpy(), atol=1e-3)  # the block output differs


def test_control_characters_in_tokens_are_shown_as_escapes():
    from lalm_probe.core.view import _visible

    assert _visible("a\x06b\x7f") == "a\\x06b\\x7f"
    assert _visible(" über\tnew\nline 中文") == " über\tnew\nline 中文"
