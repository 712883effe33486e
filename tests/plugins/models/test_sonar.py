"""The SONAR plugin: the text pipeline's tokens for labelled items, the pooled sentence embeddings as sites, errors."""

from __future__ import annotations

import pytest
import torch
from helpers import SR, tone
from lalm_probe.core.data import Stimulus
from lalm_probe.core.engine import Session
from lalm_probe.core.errors import UserError
from lalm_probe.plugins.models.sonar import Sonar


@pytest.fixture(scope="module")
def session() -> Session:
    return Session(Sonar.load("tiny"))


def test_text_items_get_the_pipeline_s_tokens_in_their_labelled_language(session):
    """Ids written down from ``TextToEmbeddingModelPipeline`` (as the arch test pins them): ``__lang__`` pieces
    ``</s>``, right-padded; the language comes from the item's label (en -> eng_Latn, fr -> fra_Latn)."""
    items = [Stimulus("a", text="the cat sat on the mat.", labels={"language": "en"}),
             Stimulus("b", text="Bonjour le chat!", labels={"language": "fr"})]
    prepared = session.prepare(items)
    assert prepared.inputs["input_ids"].tolist() == [[88, 75, 76, 77, 78, 75, 79, 67, 3, 0, 0, 0, 0],
                                                     [89, 4, 32, 19, 18, 14, 19, 25, 22, 81, 82, 70, 3]]
    assert [r["text_encoder"].spans for r in prepared.rows] == [{"text": (1, 8)}, {"text": (1, 12)}]


def test_languages_come_from_labels_codes_or_names_and_unknown_ones_are_one_sentence(session):
    plugin = session.plugin
    assert plugin.source_language(Stimulus("a", text="x", labels={"language": "deu"})) == "deu_Latn"
    assert plugin.source_language(Stimulus("a", text="x", labels={"language": "German"})) == "deu_Latn"
    with pytest.raises(UserError, match="no language 'ja'"):
        plugin.source_language(Stimulus("a", text="x", labels={"language": "ja"}))
    with pytest.raises(UserError, match="has no label 'language'"):
        plugin.source_language(Stimulus("a", text="x"))


def test_the_pooled_sentence_embeddings_are_sites(session):
    model = session.plugin.model
    text = Stimulus("t", text="hello world", labels={"language": "en"})
    speech = Stimulus("s", audio=tone(300, 1.0) + 0.01 * torch.randn(SR).numpy(), sample_rate=SR)
    for item, stack in ((text, "text_encoder"), (speech, "speech_encoder")):
        reads = session.run([item], [f"{stack}.pooled"], ["last"])
        with torch.no_grad():
            ref = model(**session.prepare([item]).inputs).sentence_embedding
        torch.testing.assert_close(reads[f"{stack}.pooled@last"], ref)


def test_a_missing_speech_encoder_is_one_sentence(tmp_path):
    from lalm_probe.plugins.models.arch.sonar_text import build_tiny_sonar_text

    with pytest.raises(UserError, match="speech encoders are per language"):
        Sonar.load(str(build_tiny_sonar_text(tmp_path)))
    with pytest.raises(UserError, match="does not exist"):
        Sonar.load("tiny", options={"speech_encoder": str(tmp_path / "spenc.fra.pt")})
