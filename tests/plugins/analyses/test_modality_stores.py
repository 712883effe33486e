"""Geometry analyses on stores laid out as the engine writes them when some items skip a stack.

Speech items pass through a speech encoder and the LM; text items only through the LM, so their rows sit in
other shards with fewer keys (or none at all, when only speech-encoder sites were asked for). Each analysis must
read a stack's keys for the items that have them, and never pair a speech-encoder row with the wrong item.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import stub_view
from lalm_probe.core.data import Dataset, Stimulus
from lalm_probe.core.plugin import Stores
from lalm_probe.core.store import ActivationStore
from lalm_probe.plugins.analyses import reps
from lalm_probe.plugins.analyses.clusters.plugin import Clusters
from lalm_probe.plugins.analyses.hub.plugin import Hub
from lalm_probe.plugins.analyses.svcca.plugin import SVCCAAnalysis
from threadpoolctl import threadpool_limits

LANGS = ("de", "en", "fr")
N_SENT, ENC, LM = 40, 2, 3  # sentences, encoder layers, LM layers


@pytest.fixture(autouse=True)
def _one_thread():
    import matplotlib.pyplot as plt

    with threadpool_limits(limits=1):
        yield
    plt.close("all")  # analyze returns figures; the run writer would close them


def _session():
    return stub_view({"enc": ENC, "lm": LM}, lens_stack="lm")


def _items() -> list[Stimulus]:
    return [Stimulus(id=f"s{s}-{lang}-{mod}", text="x" if mod == "text" else None,
                     labels={"semantic_id": f"s{s}", "language": lang, "modality": mod})
            for lang in LANGS for mod in ("speech", "text") for s in range(N_SENT)]


def _store(tmp_path, items: list[Stimulus], position: str, lm: bool = True) -> ActivationStore:
    """Speech rows: ``enc`` keys carry the sentence's latent, ``lm`` keys are noise. Text rows: ``lm`` keys carry
    the latent (or no keys at all when ``lm`` is False). Shards alternate speech / text, as batches do."""
    rng = np.random.default_rng(0)
    latent = rng.normal(size=(N_SENT, 3))
    proj = {(name, layer): rng.normal(size=(3, 16)) for name, n in (("enc", ENC), ("lm", LM)) for layer in range(n)}

    def row(it: Stimulus, name: str, layer: int) -> np.ndarray:
        s = int(it.labels["semantic_id"][1:])
        carries = (name == "enc") == (it.labels["modality"] == "speech")
        z = latent[s] if carries else rng.normal(size=3)
        return z @ proj[(name, layer)] + 0.1 * rng.normal(size=16)

    store = ActivationStore(tmp_path / f"store-{position}-{lm}", {"test": "modality"})
    groups = [[it for it in items if it.labels["modality"] == m] for m in ("speech", "text")]
    chunks = [g[i:i + 25] for i in range(0, len(groups[0]), 25) for g in groups]  # batches never mix modalities
    for chunk in chunks:
        speech = chunk[0].labels["modality"] == "speech"
        stacks = [("enc", ENC)] * speech + [("lm", LM)] * (speech or lm)
        store.add([it.id for it in chunk], {f"{name}.{layer}.out@{position}": np.array([row(it, name, layer)
                                                                                         for it in chunk])
                                            for name, n in stacks for layer in range(n)})
    store.mark_complete()
    return store


def test_store_and_reps_return_the_items_that_have_a_key(tmp_path):
    items = _items()
    store = _store(tmp_path, items, "mean", lm=False)
    assert len(store.manifest["segments"]) > 2 and store.stored_ids() == {it.id for it in items}
    speech = {it.id for it in items if it.labels["modality"] == "speech"}
    assert store.ids_with(["enc.0.out@mean", "enc.1.out@mean"]) == speech
    dataset = Dataset(items)
    notes: list[str] = []
    kept = reps.items_reaching(dataset, store, "enc", "enc.0.out@mean", notes)
    assert [it.id for it in kept] == [it.id for it in items if it.id in speech]  # dataset order
    assert notes == [f"{len(items) - len(speech)} text items never reach 'enc' (no rows for its sites), "
                     "so they are left out."]


def test_svcca_reads_the_speech_stack_for_speech_and_the_text_stack_for_text(tmp_path):
    items = _items()
    store, session = _store(tmp_path, items, "mean"), _session()
    analysis = SVCCAAnalysis(stacks=["enc", "lm"], baseline_permutations=3)
    assert analysis.requirements(session, Dataset(items)).sites == ["enc.*.out", "lm.*.out"]
    result = analysis.analyze(session, Dataset(items), Stores(baseline=store))
    for lang in LANGS:
        cm = result.arrays[f"baseline/crossmodal/{lang}"]  # speech from enc, text from lm: the shared latent
        assert cm.shape == (ENC, 3) and (cm[:, 0] > 0.9).all() and (cm[:, 0] - cm[:, 1] > 0.5).all()
    rows = next(t.rows for t in result.tables if t.title.startswith("Cross-modal"))
    assert {(r["layer"], r["text_layer"]) for r in rows} == {(0, 0), (1, LM - 1)}
    assert result.arrays["baseline/crosslingual/speech/svcca"].shape == (ENC, 3, 3)
    assert result.arrays["baseline/crosslingual/text/svcca"].shape == (LM, 3, 3)
    assert not any("never reach" in n for n in result.notes)
    # the LM rows of speech items are noise: reading them for the speech side would lose the alignment
    lm_only = SVCCAAnalysis(stack="lm", baseline="shuffled", baseline_permutations=3).analyze(session, Dataset(items), Stores(baseline=store))
    cm = lm_only.arrays["baseline/crossmodal/en"]
    assert (cm[:, 0] - cm[:, 2] < 0.3).all()


def test_svcca_on_a_stack_text_never_reaches_compares_speech_only(tmp_path):
    items = _items()
    store, session = _store(tmp_path, items, "mean", lm=False), _session()
    result = SVCCAAnalysis(stack="enc", baseline_permutations=2).analyze(session, Dataset(items), Stores(baseline=store))
    assert result.arrays["baseline/crosslingual/speech/svcca"].shape == (ENC, 3, 3)
    assert not any("crossmodal" in k or "/text/" in k for k in result.arrays)
    assert f"{N_SENT * 3} text items never reach every point of 'enc' and are left out of the text side." in result.notes


def test_clusters_and_hub_on_the_speech_stack_use_speech_items(tmp_path):
    items = _items()
    store, session = _store(tmp_path, items, "last", lm=False), _session()
    result = Clusters(stack="enc", position="last", labels=["semantic_id", "language"], space="full").analyze(
        session, Dataset(items), Stores(baseline=store))
    assert len(result.arrays["baseline/ids"]) == N_SENT * 3
    sil = result.arrays["baseline/silhouette/semantic_id/full"]
    assert sil.shape == (ENC,) and (sil > 0.5).all()  # enc rows carry the sentence
    assert any("never reach 'enc'" in n for n in result.notes)
    hub = Hub(stack="enc", position="last", language_lens=False).analyze(session, Dataset(items),
                                                                          Stores(baseline=store))
    assert {k.split("/")[-1] for k in hub.arrays if "/similarity/" in k} == {"speech: de vs en", "speech: fr vs en"}
    assert (hub.arrays["baseline/similarity/speech: de vs en"][:, 1] > 0.5).all()  # CI low: matched pairs align
