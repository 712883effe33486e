"""Per-unit AP and forcing values: equal to scikit-learn and NumPy, ties included, in chunks, from a memmap."""

from __future__ import annotations

import numpy as np
import pytest
from lalm_probe.plugins.analyses.neurons.expertise import average_precision, binary_labels, unit_expertise
from sklearn.metrics import average_precision_score


def sklearn_ap(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The reference: one sklearn call per unit, as the released code does."""
    return np.array([average_precision_score(y, x[:, j]) for j in range(x.shape[1])])


def bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (round to nearest even) and back: what a bf16 store records."""
    bits = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32)


def few_ties(rng: np.random.Generator) -> np.ndarray:
    """float32 scores where a handful of items per unit share a score (the rare ties of real float32 data)."""
    x = rng.normal(size=(300, 40)).astype(np.float32)
    x[::30] = x[1::30]
    return x


@pytest.fixture
def labels() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.random(300) < 0.2


@pytest.mark.parametrize("name, make", [
    ("normal float64", lambda rng: rng.normal(size=(300, 40))),
    ("normal float32", lambda rng: rng.normal(size=(300, 40)).astype(np.float32)),
    ("a few ties", few_ties),
    ("heavy ties: 3 values", lambda rng: rng.integers(0, 3, size=(300, 40)).astype(np.float64)),
    ("heavy ties: rounded to 0.5", lambda rng: np.round(rng.normal(size=(300, 40)) * 2) / 2),
    ("bf16-rounded", lambda rng: bf16(rng.normal(size=(300, 40)))),
    ("float16", lambda rng: rng.normal(size=(300, 40)).astype(np.float16)),
    ("negative and both zeros", lambda rng: rng.choice([-1.5, -0.0, 0.0, 2.0], size=(300, 40))),
    ("wide range float64", lambda rng: rng.normal(size=(300, 40)) * 10.0 ** rng.integers(-30, 30, size=40)),
])
def test_ap_equals_sklearn_per_unit(name: str, make, labels: np.ndarray) -> None:
    x = make(np.random.default_rng(1))
    np.testing.assert_allclose(average_precision(x, labels), sklearn_ap(x, labels), rtol=0, atol=1e-12)


def test_ap_is_the_same_for_every_chunk_size_and_on_torch(labels: np.ndarray) -> None:
    x = bf16(np.random.default_rng(2).normal(size=(300, 37)))
    reference = sklearn_ap(x, labels)
    for chunk in (1, 5, 36, 37, 1000):
        np.testing.assert_allclose(average_precision(x, labels, chunk=chunk), reference, atol=1e-12)
    np.testing.assert_allclose(average_precision(x, labels, chunk=8, device="cpu"), reference, atol=1e-12)


def test_constant_unit_scores_the_positive_rate_and_single_ties_behave_like_sklearn() -> None:
    y = np.array([1, 0, 1, 0])
    x = np.array([[0.5, 7.0], [0.5, 7.0], [0.5, 7.0], [0.1, 7.0]])
    np.testing.assert_allclose(average_precision(x, y), [2 / 3, 0.5], atol=1e-15)  # METHODS §7.2
    labels = np.random.default_rng(6).random(500) < 0.3
    constant = np.tile([-2.0, 0.0, 3.5, 1e30], (500, 1))
    np.testing.assert_allclose(average_precision(constant, labels), np.full(4, labels.mean()), atol=1e-15)
    np.testing.assert_allclose(average_precision(constant, labels), sklearn_ap(constant, labels), atol=1e-12)


def test_all_positive_gives_one_and_no_positive_gives_zero_as_sklearn() -> None:
    x = np.random.default_rng(3).normal(size=(20, 4))
    np.testing.assert_array_equal(average_precision(x, np.ones(20, dtype=bool)), np.ones(4))
    np.testing.assert_array_equal(average_precision(x, np.zeros(20, dtype=bool)), np.zeros(4))


def test_selfcond_reference_numbers() -> None:
    """apple/ml-selfcond's own unit test: RandomState(1234), 10 units x 6 sentences, labels 1,1,0,1,0,0."""
    rs = np.random.RandomState(1234)
    a, b = rs.rand(10, 6), rs.rand(10, 6)  # the reference stores units x sentences
    labels = [1, 1, 0, 1, 0, 0]
    ea, eb = unit_expertise(a.T, labels), unit_expertise(b.T, labels)
    np.testing.assert_allclose(ea.ap, [0.7222222, 0.5555556, 1.0, 1.0, 1.0, 0.6333333, 0.9166667, 0.7, 0.8055556,
                                       0.7222222], atol=5e-8)
    np.testing.assert_allclose(eb.ap, [0.7, 0.6666667, 0.7222222, 0.4111111, 0.7222222, 0.8333333, 0.7, 0.5333333,
                                       0.6333333, 0.4666667], atol=5e-8)
    np.testing.assert_allclose(ea.on_p50, [0.6221088, 0.8018722, 0.6834629, 0.7728266, 0.7887301, 0.4361734,
                                           0.9093160, 0.5333102, 0.5029668, 0.9121229], atol=5e-8)
    both = [np.concatenate([getattr(ea, k), getattr(eb, k)]).mean() for k in ("ap", "on_p50", "on_p90", "off_mean")]
    np.testing.assert_allclose(both, [0.7222222, 0.57099439, 0.77841269, 0.48743347], atol=5e-8)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_forcing_values_equal_numpy_percentiles_and_mean(dtype, labels: np.ndarray) -> None:
    x = (np.random.default_rng(4).gamma(2.0, size=(300, 23)) - 1).astype(dtype)
    for device in (None, "cpu"):
        e = unit_expertise(x, labels, chunk=6, device=device)
        np.testing.assert_array_equal(e.on_p50, np.percentile(x[labels], 50, axis=0))
        np.testing.assert_array_equal(e.on_p90, np.percentile(x[labels], 90, axis=0))
        np.testing.assert_array_equal(e.off_p50, np.percentile(x[~labels], 50, axis=0))
        np.testing.assert_allclose(e.off_mean, np.mean(x[~labels].astype(np.float64), axis=0), rtol=1e-12)
        np.testing.assert_allclose(e.ap, sklearn_ap(x, labels), atol=1e-12)
    assert (e.positives, e.negatives) == (labels.sum(), (~labels).sum())


def test_forcing_values_on_an_even_count_are_the_mean_of_the_two_middle_values() -> None:
    x = np.array([[1.0], [2.0], [10.0], [20.0], [5.0], [6.0]])
    e = unit_expertise(x, [1, 1, 1, 1, 0, 0])
    assert e.on_p50[0] == 6.0 and e.on_p90[0] == pytest.approx(17.0) and e.off_mean[0] == 5.5


def test_a_memmap_is_read_in_chunks_with_the_same_result(tmp_path, labels: np.ndarray) -> None:
    x = bf16(np.random.default_rng(5).normal(size=(300, 50)))
    mm = np.lib.format.open_memmap(tmp_path / "r.npy", mode="w+", dtype=np.float32, shape=x.shape)
    mm[:] = x
    mm.flush()
    ro = np.load(tmp_path / "r.npy", mmap_mode="r")
    e = unit_expertise(ro, labels, chunk=7)
    np.testing.assert_allclose(e.ap, sklearn_ap(x, labels), atol=1e-12)
    np.testing.assert_array_equal(e.on_p50, np.percentile(x[labels], 50, axis=0))


def test_nan_and_infinity_are_refused_like_sklearn(labels: np.ndarray) -> None:
    x = np.zeros((300, 3))
    x[5, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or infinity.*unit 2"):
        average_precision(x, labels)
    x[5, 2] = np.inf
    with pytest.raises(ValueError, match="unit 2"):
        average_precision(x, labels, chunk=2)


def test_labels_must_be_binary_and_one_per_item() -> None:
    assert binary_labels([True, False], 2).tolist() == [1, 0]
    with pytest.raises(ValueError, match="binary"):
        binary_labels([0, 1, 2], 3)
    with pytest.raises(ValueError, match="one entry per item"):
        average_precision(np.zeros((4, 2)), [0, 1, 1])
    with pytest.raises(ValueError, match="2-D"):
        average_precision(np.zeros(4), [0, 1, 1, 0])
