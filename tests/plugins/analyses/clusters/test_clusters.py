"""Clusters: silhouettes against scikit-learn, planted language/meaning layers, distance tables, end to end."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import stub_view
from lalm_probe.core.data import Dataset, Stimulus
from lalm_probe.core.errors import UserError
from lalm_probe.core.plugin import Stores
from lalm_probe.core.store import ActivationStore
from lalm_probe.plugins.analyses.clusters.measure import (
    centroid_distances,
    default_items,
    effective_perplexity,
    pairwise_distances,
    silhouette,
    silhouette_problem,
    tsne_2d,
)
from lalm_probe.plugins.analyses.clusters.plugin import Clusters, lalm_probe_analyses
from sklearn.metrics import silhouette_score
from threadpoolctl import threadpool_limits

LANGUAGE_LAYERS = {0, 1, 5}  # the other layers of the planted model cluster by meaning
N_LAYERS = 6


@pytest.fixture(autouse=True)
def _one_thread():
    """Small problems: BLAS/OpenMP thread pools only add contention on a busy test machine."""
    with threadpool_limits(limits=1):
        yield


def _items(n_sent: int = 6, langs: tuple[str, ...] = ("de", "en", "fr")) -> list[Stimulus]:
    items = []
    for s in range(n_sent):
        for lang in langs:
            for mod in ("speech", "text"):
                labels = {"semantic_id": f"s{s}", "language": lang, "modality": mod}
                if mod == "speech":
                    labels["voice"] = "m1" if s % 2 else "f1"
                items.append(Stimulus(id=f"s{s}-{lang}-{mod}", text="x" if mod == "text" else None, labels=labels))
    return items


def _planted(items: list[Stimulus], layer: int, rng: np.random.Generator, d: int = 24) -> np.ndarray:
    """Language layers: a vector per language + small noise; meaning layers: a vector per sentence."""
    lang_vec = {lang: rng.normal(size=d) * 4 for lang in ("de", "en", "fr")}
    sem_vec = {f"s{s}": rng.normal(size=d) * 4 for s in range(20)}
    key = "language" if layer in LANGUAGE_LAYERS else "semantic_id"
    table = lang_vec if key == "language" else sem_vec
    return np.array([table[it.labels[key]] + rng.normal(size=d) for it in items]) * (1 + layer)


def _session(n_layers: int = N_LAYERS, extras: tuple[str, ...] = ()):
    return stub_view({"lm": {"layers": n_layers, "components": ("out", "mlp"), "extras": extras}}, lens_stack="lm")


def _store(tmp_path, items: list[Stimulus], arrays: dict[str, np.ndarray]) -> ActivationStore:
    store = ActivationStore(tmp_path / "store", {"test": "clusters"})
    half = len(items) // 2  # two shards, to read across them
    store.add([it.id for it in items[:half]], {k: v[:half] for k, v in arrays.items()})
    store.flush()
    store.add([it.id for it in items[half:]], {k: v[half:] for k, v in arrays.items()})
    store.mark_complete()
    return store


def test_silhouette_matches_sklearn_and_undefined_cases():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 5))
    labels = ["a", "b", "c"] * 10
    assert silhouette(x, labels) == silhouette_score(x, labels)
    assert silhouette_problem(["a"] * 5) == "fewer than two classes"
    assert silhouette_problem(["a", "b", "c"]) == "every class has a single member"
    assert silhouette_problem(["a", "a", "b"]) is None
    assert np.isnan(silhouette(x[:3], ["a", "b", "c"]))


def test_tsne_is_seeded_and_handles_few_items():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 8))  # perplexity max(1, min(30, (n-1)/3)) = 4/3
    a, b = tsne_2d(x, seed=3), tsne_2d(x, seed=3)
    assert a.shape == (5, 2) and np.array_equal(a, b)
    assert effective_perplexity(5) == pytest.approx(4 / 3) and effective_perplexity(3) == 1.0
    assert effective_perplexity(30) == pytest.approx(29 / 3) and effective_perplexity(91) == 30.0
    assert effective_perplexity(1000, perplexity=50) == 50.0
    with pytest.raises(UserError):
        tsne_2d(x[:2])


def test_distances_by_hand():
    x = np.array([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0], [0.0, 2.0]])
    d = pairwise_distances(x)
    assert d[0, 1] == 5.0 and d[1, 2] == 5.0 and d[0, 2] == 10.0
    names, c = centroid_distances(x, ["b", "a", "a", "b"])  # a: (4.5, 6), b: (0, 1)
    assert names == ["a", "b"] and c[0, 1] == pytest.approx(np.hypot(4.5, 5.0))
    dn = pairwise_distances(x, normalize=True)
    assert dn[1, 2] == pytest.approx(0.0) and dn[1, 3] == pytest.approx(np.hypot(0.6, 0.2))


def test_planted_layers_are_recovered_in_both_spaces():
    items = _items()
    rng = np.random.default_rng(2)
    langs = [it.labels["language"] for it in items]
    sems = [it.labels["semantic_id"] for it in items]
    for layer in range(N_LAYERS):
        x = _planted(items, layer, rng)
        emb = tsne_2d(x)
        for space in (x, emb):
            by_lang, by_sem = silhouette(space, langs), silhouette(space, sems)
            assert (by_lang > by_sem) == (layer in LANGUAGE_LAYERS), (layer, by_lang, by_sem)


def test_default_items_follow_the_paper_layout():
    items = _items(n_sent=3, langs=("en", "fr"))
    chosen = default_items(items)
    # three versions of s0, then the matching versions of s1
    assert chosen == ["s0-en-speech", "s0-en-text", "s0-fr-speech", "s1-en-speech", "s1-en-text", "s1-fr-speech"]


def test_end_to_end(tmp_path):
    items = _items()
    rng = np.random.default_rng(3)
    arrays = {f"lm.{layer}.out@last": _planted(items, layer, rng) for layer in range(N_LAYERS)}
    items.append(Stimulus(id="odd", text="x", labels={"semantic_id": "s9", "language": "en", "modality": "text"}))
    arrays = {k: np.vstack([v, rng.normal(size=(1, v.shape[1]))]).astype(np.float32).astype(np.float64)
              for k, v in arrays.items()}  # as the store holds them
    dataset, store = Dataset(items), _store(tmp_path, items, arrays)
    session = _session()
    analysis = Clusters(space="both", plot_layers=[0, -1], normalize=True)
    req = analysis.requirements(session, dataset)
    assert req.sites == ["lm.*.out"] and req.positions == ["last"]
    assert req.labels == ["language", "semantic_id", "modality"]  # voice is only on speech items
    result = analysis.analyze(session, dataset, Stores(baseline=store))

    rows = result.tables[0].rows
    assert len(rows) == N_LAYERS
    ids = list(result.arrays["baseline/ids"])
    assert ids == [it.id for it in items]
    langs = [it.labels["language"] for it in items]
    for layer in (0, 3):
        x = arrays[f"lm.{layer}.out@last"]
        emb = result.arrays[f"baseline/tsne/{layer}"]
        assert rows[layer]["language (full)"] == pytest.approx(silhouette_score(x, langs), abs=1e-12)
        assert rows[layer]["language (tsne)"] == pytest.approx(silhouette_score(emb, langs), abs=1e-12)
    assert result.summary["language: best layer (full)"] in LANGUAGE_LAYERS
    assert result.summary["semantic_id: best layer (full)"] not in LANGUAGE_LAYERS
    # voice is scored on the speech items only, with a note
    speech = [it.labels["voice"] for it in items if "voice" in it.labels]
    x5 = arrays["lm.5.out@last"][[i for i, it in enumerate(items) if "voice" in it.labels]]
    assert rows[5]["voice (full)"] == pytest.approx(silhouette_score(x5, speech), abs=1e-12)
    assert any("voice" in n and "scored on" in n for n in result.notes)

    dist = next(t for t in result.tables if t.title.startswith("Euclidean distances"))
    assert {r["layer"] for r in dist.rows} == {0, N_LAYERS - 1}
    first, second = dist.rows[0], dist.rows[1]
    assert first["name"] == "A1" and second["name"] == "A2"  # sentence letter, version number
    a, b = first["item"], second["item"]
    xa, xb = (arrays["lm.0.out@last"][ids.index(i)] for i in (a, b))
    assert first["A2"] == pytest.approx(np.linalg.norm(xa / np.linalg.norm(xa) - xb / np.linalg.norm(xb)))
    assert [r["name"] for r in dist.rows if r["layer"] == 0][-1].startswith("B")
    cents = result.arrays["baseline/centroid_distance/language/0"]
    assert cents.shape == (3, 3) and np.allclose(np.diag(cents), 0)
    # seed 000 reads distances between "embedded vectors" too: the same tables in the 2-D t-SNE map
    in_map = next(t for t in result.tables if t.title.startswith("Euclidean distances between items in the t-SNE"))
    emb = result.arrays["baseline/tsne/0"]
    first, second = (r for r in in_map.rows if r["layer"] == 0 and r["name"] in ("A1", "A2"))
    assert first["A2"] == pytest.approx(np.linalg.norm(emb[ids.index(first["item"])] - emb[ids.index(second["item"])]))
    langs = [it.labels["language"] for it in items]
    names, by_hand = centroid_distances(emb, langs)
    np.testing.assert_allclose(result.arrays["baseline/tsne_centroid_distance/language/0"], by_hand)
    full_only = Clusters(space="full", plot_layers=[0], distances="full").analyze(session, dataset,
                                                                                  Stores(baseline=store))
    assert not any("t-SNE map" in t.title for t in full_only.tables)
    with pytest.raises(UserError, match="distances must be"):
        Clusters(distances="umap")
    assert {"silhouette_baseline", "tsne_language_baseline", "tsne_semantic_id_baseline"} <= set(result.figures)
    assert lalm_probe_analyses() == [Clusters]


def test_extra_site_labels_and_errors(tmp_path):
    items = _items(n_sent=4)
    rng = np.random.default_rng(4)
    arrays = {"lm.projector@mean": _planted(items, 0, rng)}
    session = _session(extras=("projector",))
    analysis = Clusters(site="projector", position="mean", labels=["language", "modality"], space="full")
    assert analysis.requirements(session, Dataset(items)).sites == ["lm.projector"]
    result = analysis.analyze(session, Dataset(items), Stores(baseline=_store(tmp_path, items, arrays)))
    assert [r["layer"] for r in result.tables[0].rows] == ["projector"]
    assert result.summary["language: best layer (full)"] == "projector"
    with pytest.raises(UserError, match="no item has the label"):
        Clusters(labels=["speaker"]).requirements(session, Dataset(items))
    with pytest.raises(UserError, match="no component or extra"):
        Clusters(site="nope").requirements(session, Dataset(items))
    single = [Stimulus(id=f"i{n}", text="x", labels={"language": "en"}) for n in range(4)]
    with pytest.raises(UserError, match="no silhouette"):
        Clusters(labels=["language"]).analyze(session, Dataset(single), Stores(
            baseline=_store(tmp_path / "b", single, {f"lm.{i}.out@last": rng.normal(size=(4, 3))
                                                     for i in range(N_LAYERS)})))
