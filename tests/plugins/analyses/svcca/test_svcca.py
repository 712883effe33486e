"""SVCCA: exact properties of the cca_core algorithm, a NumPy reference CCA, and planted cross-modal structure."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import stub_view
from lalm_probe.core.data import Dataset, Stimulus
from lalm_probe.core.errors import UserError
from lalm_probe.core.plugin import Stores
from lalm_probe.core.store import ActivationStore
from lalm_probe.plugins.analyses.reps import pair_layers
from lalm_probe.plugins.analyses.svcca.measure import cca_correlations, svcca, svd_reduce, variance_rank
from lalm_probe.plugins.analyses.svcca.plugin import SVCCAAnalysis, lalm_probe_analyses
from threadpoolctl import threadpool_limits


@pytest.fixture(autouse=True)
def _one_thread():
    """Small problems: BLAS/OpenMP thread pools only add contention on a busy test machine."""
    import matplotlib.pyplot as plt

    with threadpool_limits(limits=1):
        yield
    plt.close("all")  # analyze returns figures; the run writer would close them


def qr_cca(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Textbook CCA: canonical correlations = cosines of the principal angles between the centred column spaces."""
    qx, _ = np.linalg.qr(x - x.mean(0))
    qy, _ = np.linalg.qr(y - y.mean(0))
    return np.linalg.svd(qx.T @ qy, compute_uv=False)


def test_invertible_linear_transform_gives_one():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(600, 30))
    m = rng.normal(size=(30, 30))
    assert cca_correlations(a, a @ m).mean() == pytest.approx(1.0, abs=1e-6)
    assert svcca(a, a @ m, variance=1.0).similarity == pytest.approx(1.0, abs=1e-6)


def test_invariant_to_rotation_and_isotropic_scaling_of_either_side():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(400, 6))
    x = z @ rng.normal(size=(6, 40)) + 0.5 * rng.normal(size=(400, 40))
    y = z[:, :4] @ rng.normal(size=(4, 25)) + 0.5 * rng.normal(size=(400, 25))
    qx, _ = np.linalg.qr(rng.normal(size=(40, 40)))
    qy, _ = np.linalg.qr(rng.normal(size=(25, 25)))
    ref = svcca(x, y).similarity
    assert svcca(7.5 * x @ qx, y).similarity == pytest.approx(ref, abs=1e-9)
    assert svcca(x, 0.01 * y @ qy).similarity == pytest.approx(ref, abs=1e-9)
    assert svcca(3 * x @ qx, 2 * y @ qy).similarity == pytest.approx(ref, abs=1e-9)


def test_cca_matches_numpy_reference_without_svd_step():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(150, 9))
    y = x[:, :5] @ rng.normal(size=(5, 7)) + rng.normal(size=(150, 7))
    ours, ref = cca_correlations(x, y), qr_cca(x, y)
    assert ours.shape == (7,)
    np.testing.assert_allclose(ours, ref, atol=1e-7)
    assert ours.mean() == pytest.approx(ref.mean(), abs=1e-8)


def test_different_widths():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(300, 5))
    r = svcca(z @ rng.normal(size=(5, 64)), z @ rng.normal(size=(5, 16)) + 0.1 * rng.normal(size=(300, 16)))
    assert len(r.correlations) == min(r.kx, r.ky)
    assert 0.9 < r.similarity <= 1 + 1e-9


def test_iid_gaussian_is_well_below_one_and_shuffled_baseline_detects_pairing():
    rng = np.random.default_rng(4)
    r = svcca(rng.normal(size=(3000, 20)), rng.normal(size=(3000, 20)), permutations=3)
    assert r.similarity < 0.1 and r.shuffled < 0.1
    z = rng.normal(size=(500, 4))
    shared = svcca(z @ rng.normal(size=(4, 30)) + 0.3 * rng.normal(size=(500, 30)),
                   z @ rng.normal(size=(4, 20)) + 0.3 * rng.normal(size=(500, 20)), permutations=5)
    assert shared.similarity > 0.9 and shared.shuffled < 0.2


def test_item_order_does_not_matter():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(200, 30)), rng.normal(size=(200, 12))
    perm = rng.permutation(200)
    assert svcca(x[perm], y[perm]).similarity == pytest.approx(svcca(x, y).similarity, abs=1e-12)


def test_variance_counts_squared_singular_values_and_k_stays_below_items():
    s = np.array([3.0, 2.0, 1.0])  # s² shares: 9/14, 13/14, 1; s shares: 1/2, 5/6, 1
    assert variance_rank(s**2, 0.9) == 2  # an s-based rule would need all 3
    assert variance_rank(s**2, 0.5) == 1
    assert variance_rank(s**2, 1.0) == 3
    assert variance_rank(np.zeros(3), 0.9) == 0
    rng = np.random.default_rng(6)
    assert svd_reduce(rng.normal(size=(10, 50)), 1.0).shape[1] == 9  # cca_core needs k < n


@pytest.mark.parametrize("shape", [(40, 120), (120, 40)])
def test_svd_step_matches_numpy_svd(shape):
    rng = np.random.default_rng(7)
    x = rng.normal(size=shape) @ np.diag(np.linspace(3, 0.1, shape[1]))
    xc = x - x.mean(0)
    u, s, _ = np.linalg.svd(xc, full_matrices=False)
    k = int(np.searchsorted(np.cumsum(s**2) / np.sum(s**2), 0.9) + 1)
    ours = svd_reduce(x, 0.9)
    assert ours.shape[1] == k
    # same subspace and the same per-direction scale (columns agree up to sign)
    np.testing.assert_allclose(np.abs(ours), np.abs(u[:, :k] * s[:k]), atol=1e-8)


def test_layer_pairing_by_relative_depth():
    assert pair_layers(3, 3) == [(0, 0), (1, 1), (2, 2)]
    assert pair_layers(4, 7) == [(0, 0), (1, 2), (2, 4), (3, 6)]
    assert pair_layers(7, 4) == [(0, 0), (2, 1), (4, 2), (6, 3)]


# ---- end to end on a real store with planted structure ---------------------------------------------------
ALIGNED = {2, 3}  # layers where speech and text of a sentence share structure


def _session(stacks: dict[str, int]):
    return stub_view(stacks)


def _planted(tmp_path, n_sent: int = 60, stacks: dict[str, tuple[int, int]] | None = None):
    """en/fr/de speech+text for n_sent sentences. Text of all languages shares one latent per sentence (so
    cross-lingual text is aligned everywhere); speech matches its text only at the ALIGNED layers."""
    rng = np.random.default_rng(0)
    stacks = stacks or {"lm": (5, 24)}
    langs = ["de", "en", "fr"]
    latent = rng.normal(size=(n_sent, 4))
    items, arrays = [], {}
    for lang in langs:
        for mod in ("speech", "text"):
            for s in range(n_sent):
                items.append(Stimulus(id=f"s{s}-{lang}-{mod}", text="x" if mod == "text" else None,
                                      labels={"semantic_id": f"s{s}", "language": lang, "modality": mod}))
    for name, (depth, width) in stacks.items():
        for layer in range(depth):
            proj = rng.normal(size=(4, width))
            rows = []
            for it in items:
                s = int(it.labels["semantic_id"][1:])
                shared = it.labels["modality"] == "text" or layer in ALIGNED
                z = latent[s] if shared else rng.normal(size=4)
                rows.append(z @ proj + 0.2 * rng.normal(size=width))
            arrays[f"{name}.{layer}.out@mean"] = np.array(rows)
    store = ActivationStore(tmp_path / "store", {"test": "svcca"})
    order = rng.permutation(len(items))  # the store's row order must not matter
    store.add([items[i].id for i in order], {k: v[order] for k, v in arrays.items()})
    store.mark_complete()
    depths = {name: d for name, (d, _) in stacks.items()}
    return Dataset(items), store, depths


def test_end_to_end_cross_modal_and_cross_lingual(tmp_path):
    dataset, store, depths = _planted(tmp_path)
    session = _session(depths)
    analysis = SVCCAAnalysis(baseline="both", baseline_permutations=3)
    req = analysis.requirements(session, dataset)
    assert req.sites == ["lm.*.out"] and req.positions == ["mean"] and "semantic_id" in req.labels
    result = analysis.analyze(session, dataset, Stores(baseline=store))
    cm = result.arrays["baseline/crossmodal/en"]  # (layers, [svcca, random_baseline, shuffled_baseline])
    assert cm.shape == (5, 3)
    for layer in range(5):
        if layer in ALIGNED:
            assert cm[layer, 0] > 0.9 and cm[layer, 0] - cm[layer, 1] > 0.5 and cm[layer, 0] - cm[layer, 2] > 0.5
        else:
            assert abs(cm[layer, 0] - cm[layer, 2]) < 0.15  # unrelated: at the shuffled baseline
    assert result.summary["cross-modal en: best layer (svcca - baseline)"] in ALIGNED
    text = result.arrays["baseline/crosslingual/text/svcca"]
    assert text.shape == (5, 3, 3) and np.allclose(text, text.transpose(0, 2, 1))
    assert np.all(text[:, 0, 1] > 0.9)
    assert list(result.arrays["baseline/crosslingual/text/languages"]) == ["de", "en", "fr"]
    titles = [t.title for t in result.tables]
    assert any("Cross-modal" in t for t in titles) and any("mean over language pairs (speech)" in t for t in titles)
    rows = next(t for t in result.tables if t.title.startswith("Cross-modal")).rows
    assert {"language", "layer", "k_speech", "k_text", "svcca", "random_baseline", "shuffled_baseline"} <= set(rows[0])
    assert {"svcca_crossmodal_baseline", "svcca_languages_text_baseline"} <= set(result.figures)
    assert lalm_probe_analyses() == [SVCCAAnalysis]


def test_end_to_end_two_stacks_of_different_depth_and_width(tmp_path):
    dataset, store, depths = _planted(tmp_path, n_sent=40, stacks={"speech_encoder": (7, 32), "text_encoder": (4, 12)})
    # the planted alignment sits at speech layers 2-3; text layers carry the latent at every layer
    session = _session(depths)
    analysis = SVCCAAnalysis(stacks=["speech_encoder", "text_encoder"], compare=["modality"],
                             baseline_permutations=2)
    assert analysis.requirements(session, dataset).sites == ["speech_encoder.*.out", "text_encoder.*.out"]
    result = analysis.analyze(session, dataset, Stores(baseline=store))
    rows = result.tables[0].rows
    pairs = sorted({(r["layer"], r["text_layer"]) for r in rows})
    assert pairs == [(0, 0), (2, 1), (4, 2), (6, 3)]
    by_layer = {r["layer"]: r["svcca"] for r in rows if r["language"] == "en"}
    assert by_layer[2] > 0.9 > by_layer[4]


def test_no_pairs_is_a_user_error(tmp_path):
    items = [Stimulus(id=f"i{n}", text="x", labels={"semantic_id": f"s{n}", "language": "en" if n % 2 else "fr",
                                                     "modality": "text"}) for n in range(12)]
    store = ActivationStore(tmp_path / "s", {})
    store.add([it.id for it in items], {f"lm.{i}.out@mean": np.random.default_rng(i).normal(size=(12, 4))
                                        for i in range(2)})
    store.mark_complete()
    with pytest.raises(UserError, match="no pair of groups"):
        SVCCAAnalysis().analyze(_session({"lm": 2}), Dataset(items), Stores(baseline=store))
    with pytest.raises(UserError, match="variance"):
        SVCCAAnalysis(variance=1.5)


def test_a_constant_layer_reports_nan_instead_of_failing(tmp_path):
    rng = np.random.default_rng(8)
    items = [Stimulus(id=f"s{n}-{mod}", text="x", labels={"semantic_id": f"s{n}", "language": "en", "modality": mod})
             for n in range(8) for mod in ("speech", "text")]
    store = ActivationStore(tmp_path / "s", {})
    store.add([it.id for it in items], {"lm.0.out@mean": np.ones((16, 4)), "lm.1.out@mean": rng.normal(size=(16, 4))})
    store.mark_complete()
    result = SVCCAAnalysis(baseline_permutations=1).analyze(_session({"lm": 2}), Dataset(items), Stores(baseline=store))
    rows = result.tables[0].rows
    assert np.isnan(rows[0]["svcca"]) and rows[0]["k_speech"] == 0 and np.isfinite(rows[1]["svcca"])
    assert result.summary["cross-modal en: best layer (svcca - baseline)"] == 1


# ---- the paper's baseline, points outside the layers and the seed-001 tables -------------------------------
def test_the_default_baseline_is_svcca_of_random_vectors_of_the_same_sizes(tmp_path):
    """Lee et al.: "SVCCA scores between random vectors of the same sizes as the analyzed representations"."""
    from lalm_probe.plugins.analyses.svcca.measure import random_vectors_baseline

    dataset, store, depths = _planted(tmp_path, n_sent=30)
    result = SVCCAAnalysis(compare=["modality"]).analyze(_session(depths), dataset, Stores(baseline=store))
    rows = result.tables[0].rows
    assert "shuffled_baseline" not in rows[0] and result.summary["baselines"] == ["random_baseline"]
    rng = np.random.default_rng(0)  # by hand: 5 draws of 30 x 24 standard normal vectors per side
    by_hand = np.mean([svcca(rng.standard_normal((30, 24)), rng.standard_normal((30, 24))).similarity
                       for _ in range(5)])
    assert all(r["random_baseline"] == pytest.approx(by_hand) for r in rows)  # sizes only: the same everywhere
    assert random_vectors_baseline(30, 24, 24) == pytest.approx(by_hand)
    assert 0.3 < by_hand < 1  # 30 items, 90% of 24 isotropic units: CCA overfits, far from 0
    both = SVCCAAnalysis(compare=["modality"], baseline="both").analyze(_session(depths), dataset,
                                                                        Stores(baseline=store))
    assert {"random_baseline", "shuffled_baseline"} <= set(both.tables[0].rows[0])
    with pytest.raises(UserError, match="baseline must be one of"):
        SVCCAAnalysis(baseline="permuted")


def _with_extras(tmp_path, n_sent=30):
    """The planted store plus an input point (``lm.embed``: text carries the latent, speech does not) and an
    output point (``lm.adaptor``: both carry it)."""
    dataset, store, depths = _planted(tmp_path, n_sent=n_sent)
    rng = np.random.default_rng(3)
    latent = rng.normal(size=(n_sent, 4))
    ids = [it.id for it in dataset]
    extra = {}
    for key, speech_too in (("lm.embed@mean", False), ("lm.adaptor@mean", True)):
        proj = rng.normal(size=(4, 16))
        extra[key] = np.array([(latent[int(it.labels["semantic_id"][1:])] if speech_too
                                or it.labels["modality"] == "text" else rng.normal(size=4)) @ proj
                               + 0.1 * rng.normal(size=16) for it in dataset])
    more = ActivationStore(tmp_path / "more", {"test": "svcca"})
    more.add(ids, {**{f"lm.{layer}.out@mean": store.array(f"lm.{layer}.out@mean", ids)[:] for layer in range(5)},
                   **extra})
    more.mark_complete()
    view = stub_view({"lm": {"layers": 5, "extras": ("embed", "adaptor")}})
    return dataset, more, view


def test_points_before_and_after_the_layers(tmp_path):
    """Seed 001 App. B: input embeddings ("in") and the speech after the length adaptor ("len") are points."""
    dataset, store, view = _with_extras(tmp_path)
    spec = SVCCAAnalysis(compare=["modality", "language"], inputs=["lm.embed", "embed"],
                         outputs=["lm.adaptor", "adaptor"], baseline="shuffled", baseline_permutations=2)
    assert spec.requirements(view, dataset).sites == ["lm.*.out", "lm.embed", "lm.adaptor"]
    result = spec.analyze(view, dataset, Stores(baseline=store))
    assert list(result.arrays["baseline/crossmodal/points"]) == ["in", "0", "1", "2", "3", "4", "out"]
    cm = result.arrays["baseline/crossmodal/en"]
    assert cm[0, 0] < 0.6 and cm[-1, 0] > 0.9  # speech and text meet after the "adaptor", not at the input
    assert result.arrays["baseline/crosslingual/text/svcca"].shape == (7, 3, 3)
    assert result.arrays["baseline/crosslingual/text/svcca"][0, 0, 1] > 0.9  # text carries it at the input
    with pytest.raises(UserError, match="not a stack-level site"):
        SVCCAAnalysis(inputs=["lm.features", "none"]).points(view)
    with pytest.raises(UserError, match="two sites"):
        SVCCAAnalysis(inputs=["lm.embed"])


def test_text_of_one_language_vs_speech_of_another_and_the_gap_table(tmp_path):
    """Fig. 5: text of A against its own speech, its text translations and their speech, at the last point."""
    dataset, store, view = _with_extras(tmp_path)
    spec = SVCCAAnalysis(compare=["modality", "language", "modality+language"], outputs=["adaptor", "adaptor"],
                         baseline="none")
    result = spec.analyze(view, dataset, Stores(baseline=store))
    mixed = result.arrays["baseline/text_vs_speech/svcca"]  # (points, text languages, speech languages)
    assert mixed.shape == (6, 3, 3) and np.isnan(mixed[:, 0, 0]).all()  # same language: the cross-modal table
    assert mixed[-1, 0, 1] > 0.9 and mixed[0, 0, 1] < 0.6  # the planted adaptor aligns everything; layer 0 not
    gap = next(t for t in result.tables if t.title.startswith("Language gap vs modality gap")).rows
    assert [r["text_language"] for r in gap] == ["de", "en", "fr"] and all(r["layer"] == "out" for r in gap)
    de = gap[0]
    assert de["cross-modal (own speech)"] == pytest.approx(result.arrays["baseline/crossmodal/de"][-1, 0])
    assert de["cross-lingual speech min"] == pytest.approx(min(mixed[-1, 0, 1], mixed[-1, 0, 2]))
    text = result.arrays["baseline/crosslingual/text/svcca"][-1]
    assert de["cross-lingual text max"] == pytest.approx(max(text[0, 1], text[0, 2]))


def test_resource_levels_equal_n_and_shared_tokens(tmp_path):
    """Fig. 2's averages per resource level, the paper's cut to equal n, and §3.2's shared-token correlation."""
    from scipy import stats

    dataset, store, depths = _planted(tmp_path, n_sent=30)
    items = [it for it in dataset if not (it.labels["language"] == "fr" and int(it.labels["semantic_id"][1:]) >= 20)]
    words = {"de": "der die das", "en": "the a an", "fr": "le la les"}
    for it in items:  # en and de share a word, fr shares none: token overlap differs by pair
        if it.text is not None:
            s = it.labels["semantic_id"]
            it.text = f"{s} {words[it.labels['language']]} {'und' if it.labels['language'] in ('de', 'en') else ''}"
    data = Dataset(items)

    class Words:  # one id per distinct word (no hash collisions)
        vocab: dict[str, int] = {}

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]}

    view = stub_view(depths, tokenizer=Words())
    levels = tmp_path / "levels.tsv"
    levels.write_text("deu\thigh\neng\thigh\n")
    result = SVCCAAnalysis(levels=str(levels), equal_n=True, token_overlap=True, baseline="none").analyze(
        view, data, Stores(baseline=store))
    rows = result.tables[0].rows
    assert {r["items"] for r in rows} == {20}  # fr has 20 sentences: everything is cut to the first 20
    by_level = next(t for t in result.tables if "by resource level" in t.title).rows
    high = [r["svcca"] for r in by_level if r["level"] == "high"]
    np.testing.assert_allclose(high, (result.arrays["baseline/crossmodal/de"][:, 0]
                                      + result.arrays["baseline/crossmodal/en"][:, 0]) / 2)
    assert {r["level"] for r in by_level} == {"high", "unlisted"}
    shared = next(t for t in result.tables if t.title.startswith("Shared tokens")).rows
    share = {(r["language_a"], r["language_b"]): r["shared_tokens"] for r in shared}
    assert share[("de", "en")] == pytest.approx(2 / 8) and share[("de", "fr")] == pytest.approx(1 / 8)
    r, p = stats.pearsonr([row["shared_tokens"] for row in shared], [row["svcca"] for row in shared])
    key = next(k for k in result.summary if k.startswith("shared tokens vs text SVCCA"))
    assert result.summary[key] == pytest.approx([r, p])
    with pytest.raises(UserError, match="levels file not found"):
        SVCCAAnalysis(levels=str(tmp_path / "nope.tsv")).requirements(view, data)
