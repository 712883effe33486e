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
    with threadpool_limits(limits=1):
        yield


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
    assert r.similarity < 0.1 and r.baseline < 0.1
    z = rng.normal(size=(500, 4))
    shared = svcca(z @ rng.normal(size=(4, 30)) + 0.3 * rng.normal(size=(500, 30)),
                   z @ rng.normal(size=(4, 20)) + 0.3 * rng.normal(size=(500, 20)), permutations=5)
    assert shared.similarity > 0.9 and shared.baseline < 0.2


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
    analysis = SVCCAAnalysis(baseline_permutations=3)
    req = analysis.requirements(session, dataset)
    assert req.sites == ["lm.*.out"] and req.positions == ["mean"] and "semantic_id" in req.labels
    result = analysis.analyze(session, dataset, Stores(baseline=store))
    cm = result.arrays["baseline/crossmodal/en"]  # (layers, [svcca, baseline])
    assert cm.shape == (5, 2)
    for layer in range(5):
        if layer in ALIGNED:
            assert cm[layer, 0] > 0.9 and cm[layer, 0] - cm[layer, 1] > 0.5
        else:
            assert abs(cm[layer, 0] - cm[layer, 1]) < 0.15  # unrelated: at the shuffled baseline
    assert result.summary["cross-modal en: best layer (svcca - baseline)"] in ALIGNED
    text = result.arrays["baseline/crosslingual/text/svcca"]
    assert text.shape == (5, 3, 3) and np.allclose(text, text.transpose(0, 2, 1))
    assert np.all(text[:, 0, 1] > 0.9)
    assert list(result.arrays["baseline/crosslingual/text/languages"]) == ["de", "en", "fr"]
    titles = [t.title for t in result.tables]
    assert any("Cross-modal" in t for t in titles) and any("mean over language pairs (speech)" in t for t in titles)
    rows = next(t for t in result.tables if t.title.startswith("Cross-modal")).rows
    assert {"language", "layer", "k_speech", "k_text", "svcca", "baseline"} <= set(rows[0])
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
