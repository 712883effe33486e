"""Semantic hub: Eq. 1 on hand-made and random data, the token-language table by hand, and end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import stub_view
from lalm_probe.core.data import Dataset, Stimulus
from lalm_probe.core.errors import UserError
from lalm_probe.core.model import Prompt
from lalm_probe.core.plugin import Stores
from lalm_probe.core.store import ActivationStore
from lalm_probe.plugins.analyses.hub.measure import (
    adjusted_scores,
    baseline_adjusted_cosine,
    count_tokens,
    entropy,
    language_given_hidden,
    language_given_token,
    mean_ci,
    read_corpus,
)
from lalm_probe.plugins.analyses.hub.plugin import Hub, lalm_probe_analyses
from scipy import stats
from threadpoolctl import threadpool_limits


@pytest.fixture(autouse=True)
def _one_thread():
    with threadpool_limits(limits=1):
        yield


def test_eq1_on_a_hand_made_matrix():
    sim = np.array([[0.9, 0.1, 0.2], [0.3, 0.8, 0.0], [0.1, 0.2, 0.7]])
    scores, off = adjusted_scores(sim)
    assert off == pytest.approx(0.15)  # (0.1+0.2+0.3+0.0+0.1+0.2) / 6
    np.testing.assert_allclose(scores, [0.75, 0.65, 0.55])


def test_unrelated_data_scores_zero_and_shared_structure_scores_positive():
    rng = np.random.default_rng(0)
    draws = []
    for _ in range(300):
        # a shared offset makes every raw cosine high; the baseline removes it
        x, y = 2 + rng.normal(size=(12, 16)), 2 + rng.normal(size=(12, 16))
        scores, off = baseline_adjusted_cosine(x, y)
        draws.append(scores.mean())
    assert off > 0.5
    assert abs(np.mean(draws)) < 0.01
    z = rng.normal(size=(30, 16))
    scores, _ = baseline_adjusted_cosine(z + 0.5 * rng.normal(size=z.shape), z + 0.5 * rng.normal(size=z.shape))
    m, lo, hi = mean_ci(scores)
    assert lo > 0.5 and lo < m < hi


def test_confidence_intervals():
    v = np.random.default_rng(1).normal(0.3, 0.1, size=25)
    m, lo, hi = mean_ci(v)
    ref = stats.t.interval(0.95, len(v) - 1, loc=v.mean(), scale=stats.sem(v))
    assert (lo, hi) == pytest.approx(ref)
    mb, blo, bhi = mean_ci(v, method="bootstrap", seed=0)
    assert mb == m and blo < m < bhi and abs((bhi - blo) - (hi - lo)) < 0.03
    assert mean_ci(np.ones(4)) == (1.0, 1.0, 1.0)


def test_token_language_table_by_hand():
    #            en  fr        p(w|en): .5 .25 .25 0 0 ; p(w|fr): 0 1/8 3/8 0 1/2
    counts = np.array([[2, 0], [1, 1], [1, 3], [0, 0], [0, 4]])
    p = language_given_token(counts)
    expected = np.array([[1, 0], [2 / 3, 1 / 3], [0.4, 0.6], [0.5, 0.5], [0, 1]])
    np.testing.assert_allclose(p, expected, atol=1e-12)
    np.testing.assert_allclose(p.sum(axis=1), 1.0)


def test_language_given_hidden_truncates_and_sums_to_one():
    rng = np.random.default_rng(2)
    table = language_given_token(rng.integers(0, 3, size=(20, 3)))
    logits = rng.normal(size=(7, 24))  # a padded unembedding: 4 logits beyond the table's vocabulary
    p = language_given_hidden(logits, table)
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    lens = np.exp(logits[:, :20]) / np.exp(logits[:, :20]).sum(1, keepdims=True)
    np.testing.assert_allclose(p, lens @ table)
    assert entropy(np.array([[0.5, 0.5, 0.0]]))[0] == pytest.approx(np.log(2))
    with pytest.raises(ValueError):
        language_given_hidden(logits[:, :10], table)


class LetterTokenizer:
    """a..j are English tokens 0-9, k..t French tokens 10-19 (the fake model's vocabulary)."""

    vocab_size = 20

    def __call__(self, text: str | list[str], add_special_tokens: bool = True) -> dict:
        if isinstance(text, list):  # a batch, as HF tokenizers take it
            return {"input_ids": [self(t, add_special_tokens)["input_ids"] for t in text]}
        return {"input_ids": [ord(c) - ord("a") for c in text if c.isalpha()] + ([99] if add_special_tokens else [])}


def test_count_tokens_and_corpus_file(tmp_path):
    langs, counts = count_tokens(LetterTokenizer(), {"fr": ["kkl"], "en": ["ab a"]}, 20)
    assert langs == ["en", "fr"]
    assert counts[0].tolist() == [2, 0] and counts[10].tolist() == [0, 2] and counts.sum() == 6
    f = tmp_path / "corpus.tsv"
    f.write_text("en\tabc\n# comment\nfr\tklm\n{\"language\": \"de\", \"text\": \"x\"}\n")
    assert read_corpus(f) == {"en": ["abc"], "fr": ["klm"], "de": ["x"]}
    with pytest.raises(UserError):
        read_corpus(tmp_path / "missing.tsv")


def test_text_corpora_are_the_dataset_only_on_request():
    speech = [Stimulus(f"{lang}-1", audio=np.zeros(160), sample_rate=16000,
                       labels={"language": lang, "transcript": "Guten Tag." if lang == "deu" else "Hello."})
              for lang in ("deu", "English")]
    assert Hub(corpus="dataset").texts(Dataset(speech)) == {"deu": ["Guten Tag."], "English": ["Hello."]}
    builtin = Hub(corpus="builtin").texts(Dataset(speech))
    assert set(builtin) >= {"de", "en", "zh"} and "Die Katze schläft auf dem Bett." in builtin["de"]
    assert Hub().corpus == "wordfreq"  # the default: an independent word-frequency resource


def test_wordfreq_token_counts_by_hand(qwen_session):
    """Each of a language's most frequent words, tokenized after a space as in running text, adds its frequency
    to every token it is made of (with multiplicity)."""
    import wordfreq
    from lalm_probe.plugins.analyses.hub.measure import wordfreq_counts

    tok = qwen_session.plugin.tokenizer
    langs, counts = wordfreq_counts(tok, ["fr", "en"], tok.vocab_size, words=50)
    assert langs == ["en", "fr"]
    by_hand = np.zeros(tok.vocab_size)
    for word in wordfreq.top_n_list("fr", 50):
        for i in tok(" " + word, add_special_tokens=False)["input_ids"]:
            by_hand[i] += \
                wordfreq.get_frequency_dict("fr")[word]
    np.testing.assert_allclose(counts[:, 1], by_hand)  # one joined text, split back per word: the same counts
    _, again = wordfreq_counts(tok, ["en", "fr"], tok.vocab_size, words=50)  # read back from the cache
    np.testing.assert_array_equal(again, counts)
    assert counts[:, 0].sum() > 0 and not np.allclose(counts[:, 0], counts[:, 1])
    _, zh = wordfreq_counts(tok, ["zh"], tok.vocab_size, words=5)  # written without spaces: bare words
    first = wordfreq.top_n_list("zh", 5)[0]
    assert zh[tok(first, add_special_tokens=False)["input_ids"][0], 0] > 0


# ---- end to end ------------------------------------------------------------------------------------------
N_LAYERS, D, N_SENT = 5, 24, 10
HUB_LAYERS = {2, 3}  # matched items share a state here, and the lens reads English tokens


def _planted(tmp_path):
    """en/fr speech+text. Hidden size 24 = 20 token directions + 4 spare; the lens is 8·h on the token part.
    Outside the hub layers a state points at its own language's tokens plus item noise; inside, at the
    English token of its sentence (shared by all versions of a sentence)."""
    rng = np.random.default_rng(0)
    items, rows = [], {layer: [] for layer in range(N_LAYERS)}
    for s in range(N_SENT):
        for lang in ("en", "fr"):
            for mod in ("speech", "text"):
                text = "abcdefghij"[s] * 3 if lang == "en" else "klmnopqrst"[s] * 3
                items.append(Stimulus(id=f"s{s}-{lang}-{mod}", text=text if mod == "text" else None,
                                      labels={"semantic_id": f"s{s}", "language": lang, "modality": mod}))
                for layer in range(N_LAYERS):
                    h = 0.1 * rng.normal(size=D)
                    if layer in HUB_LAYERS:
                        h[s] += 1.0  # the English token of sentence s
                    else:
                        h[rng.integers(0, 10) + (0 if lang == "en" else 10)] += 1.0
                    rows[layer].append(h)
    store = ActivationStore(tmp_path / "store", {"test": "hub"})
    store.add([it.id for it in items], {f"lm.{layer}.out@last": np.array(rows[layer]) for layer in range(N_LAYERS)})
    store.mark_complete()
    unembed = np.zeros((D, 22))  # 22 logits: the model pads its vocabulary beyond the tokenizer's 20
    unembed[:20, :20] = 8 * np.eye(20)

    def lens(hidden, stack=None, norm=True, layer=None):
        assert stack == "lm" and norm is False
        return torch.as_tensor(np.asarray(hidden) @ unembed)

    session = stub_view({"lm": {"layers": N_LAYERS, "unembed": "lm_head"}}, lens_stack="lm",
                        tokenizer=LetterTokenizer(), lens=lens)
    return Dataset(items), store, session


def test_end_to_end(tmp_path):
    dataset, store, session = _planted(tmp_path)
    hub = Hub(corpus="dataset")  # the planted vocabulary: a table from the items' own letters
    req = hub.requirements(session, dataset)
    assert req.sites == ["lm.*.out"] and req.positions == ["last"] and set(req.labels) == {"language", "semantic_id"}
    result = hub.analyze(session, dataset, Stores(baseline=store))

    sim = result.arrays["baseline/similarity/en: speech vs text"]  # (layers, [mean, lo, hi])
    assert sim.shape == (N_LAYERS, 3)
    for layer in range(N_LAYERS):
        if layer in HUB_LAYERS:
            assert sim[layer, 1] > 0.3  # CI clear of zero
        else:
            assert abs(sim[layer, 0]) < 0.2
    assert result.summary["similarity: best layer (mean over comparisons)"] in HUB_LAYERS
    ci_rows = [r for t in result.tables if "95% CI" in t.title for r in t.rows]
    assert all(r["matched_cos"] - r["nonmatched_cos"] == pytest.approx(r["score"]) for r in ci_rows)
    names = {r["comparison"] for r in ci_rows}
    assert names == {"en: speech vs text", "fr: speech vs text", "speech: fr vs en", "text: fr vs en"}

    p = result.arrays["baseline/language_lens/p_language"]  # (layers, items, [en, fr])
    assert p.shape == (N_LAYERS, len(dataset), 2)
    np.testing.assert_allclose(p.sum(-1), 1.0)
    assert list(result.arrays["token_table/languages"]) == ["en", "fr"]
    lens_rows = next(t for t in result.tables if t.title.startswith("Lens language")).rows
    fr_text = {r["layer"]: r for r in lens_rows if r["input_language"] == "fr" and r["modality"] == "text"}
    assert fr_text[0]["p_input"] > 0.8 and fr_text[0]["p_en"] < 0.2  # early: the input language
    assert fr_text[2]["p_en"] > 0.8 and fr_text[2]["top_language"] == "en"  # hub layers: English
    assert result.summary["p(en|h), non-en speech input: peak layer"] in HUB_LAYERS
    assert {"hub_similarity_baseline", "hub_language_lens_baseline"} <= set(result.figures)
    assert lalm_probe_analyses() == [Hub]


def test_options_and_errors(tmp_path):
    dataset, store, session = _planted(tmp_path)
    result = Hub(compare=["language"], pairs="all", language_lens=False, ci="bootstrap").analyze(
        session, dataset, Stores(baseline=store, intervened=store))
    assert {"baseline/similarity/text: en vs fr", "intervened/similarity/speech: en vs fr"} <= set(result.arrays)
    assert not any(k.startswith("baseline/language_lens") for k in result.arrays)
    texts = Hub(corpus="dataset").texts(dataset)
    assert set(texts) == {"en", "fr"} and texts["en"][0] == "aaa"
    assert set(Hub(corpus="builtin").texts(dataset)) >= {"en", "fr", "de", "zh"}
    lonely = Dataset([Stimulus(id=f"i{n}", text="ab", labels={"semantic_id": f"s{n}", "language": "en"})
                      for n in range(3)])
    s2 = ActivationStore(tmp_path / "s2", {})
    s2.add([it.id for it in lonely], {f"lm.{i}.out@last": np.ones((3, D)) for i in range(N_LAYERS)})
    s2.mark_complete()
    with pytest.raises(UserError, match="no matched pairs"):
        Hub(language_lens=False).analyze(session, lonely, Stores(baseline=s2))
    with pytest.raises(UserError, match="at least two languages"):
        Hub(similarity=False, corpus="dataset").analyze(session, lonely, Stores(baseline=s2))
    with pytest.raises(UserError, match="wordfreq has no word list for xx"):
        Hub(similarity=False, table_languages=["en", "xx"]).analyze(session, lonely, Stores(baseline=s2))
    with pytest.raises(UserError):
        Hub(pairs="some")


def test_the_last_layer_is_compared_after_the_final_norm(tmp_path):
    """The reference reads HF hidden_states, whose last entry is normed: a final norm that removes what the block
    output carries beside the shared meaning (here a loud item-specific unit) must be applied before the cosine."""
    dataset, store, view = _planted(tmp_path)
    ids = [it.id for it in dataset]
    last = f"lm.{N_LAYERS - 1}.out@last"
    raw = store.array(last, ids)[:]
    rng = np.random.default_rng(1)
    loud = raw.copy()
    loud[:, :20] = 0.0
    loud[np.arange(len(ids)) % 4 < 2, 0] = 1.0  # en items: sentence-independent
    loud[np.arange(len(ids)), 5 + np.arange(len(ids)) // 4] = 1.0  # ... the meaning, shared by a sentence's versions
    loud[:, 20:] = 50 * rng.normal(size=(len(ids), D - 20))  # loud units that differ per item
    s2 = ActivationStore(tmp_path / "s2", {})
    s2.add(ids, {**{f"lm.{i}.out@last": store.array(f"lm.{i}.out@last", ids)[:] for i in range(N_LAYERS - 1)},
                 last: loud})
    s2.mark_complete()
    weight = np.ones(D)
    weight[20:] = 0.0
    view.final_norm = lambda h, stack: np.asarray(h, dtype=np.float64) * weight  # RMSNorm-like: a weight per unit
    result = Hub(language_lens=False, compare=["modality"]).analyze(view, dataset, Stores(baseline=s2))
    sim = result.arrays["baseline/similarity/en: speech vs text"]
    assert sim[-1, 0] == pytest.approx(0.5)  # normed: matched cosine 1, non-matched 0.5 (en shares unit 0)
    view.final_norm = lambda h, stack: np.asarray(h, dtype=np.float64)
    raw_sim = Hub(language_lens=False, compare=["modality"]).analyze(view, dataset, Stores(baseline=s2))
    assert raw_sim.arrays["baseline/similarity/en: speech vs text"][-1, 0] < 0.3  # the loud units dominate


def test_the_default_token_table_comes_from_wordfreq_not_from_the_data(tmp_path):
    """Item 7: p(language | token) from an independent word-frequency resource, so the sentences analysed do not
    decide the table that scores them; the dataset's own texts only with corpus=dataset."""
    from lalm_probe.plugins.analyses.hub.measure import wordfreq_languages

    dataset, store, view = _planted(tmp_path)
    hub = Hub(similarity=False, table_words=300)
    result = hub.analyze(view, dataset, Stores(baseline=store))
    assert result.summary["token table: source"].startswith("wordfreq")
    assert result.summary["token table: languages"] == wordfreq_languages() and len(wordfreq_languages()) >= 40
    other = Dataset([Stimulus(it.id, text=("zzz" if it.text else None), labels=it.labels) for it in dataset])
    again = hub.analyze(view, other, Stores(baseline=store))  # other texts, same states: the same table
    np.testing.assert_array_equal(result.arrays["baseline/language_lens/p_language"],
                                  again.arrays["baseline/language_lens/p_language"])
    circular = Hub(similarity=False, corpus="dataset").analyze(view, other, Stores(baseline=store))
    assert circular.summary["token table: source"] == "dataset"
    assert circular.summary["token table: languages"] == ["en", "fr"]


def test_the_language_distribution_averages_every_position_of_each_input(tmp_path):
    """Seed 004 Fig. 4: p(z | h_t) averaged over the token positions t of each input (then over inputs), with the
    entropy of that distribution; not one position per item."""
    from lalm_probe.plugins.analyses.hub.measure import count_tokens, language_given_token

    dataset, store, view = _planted(tmp_path)
    ids = [it.id for it in dataset]
    rng = np.random.default_rng(5)
    lengths = rng.integers(2, 6, size=len(ids))
    ragged = {}
    for layer in range(N_LAYERS):
        rows = []
        for n, it in enumerate(dataset):
            h = 0.1 * rng.normal(size=(lengths[n], D))
            own = 0 if it.labels["language"] == "en" else 10
            h[np.arange(lengths[n]), own + rng.integers(0, 10, size=lengths[n])] += 1.0
            h[0, :20] = 0.0
            h[0, 3] = 1.0  # every input's first position reads English
            rows.append(h)
        ragged[f"lm.{layer}.out@all"] = rows
    s2 = ActivationStore(tmp_path / "ragged", {})
    s2.add(ids, ragged)
    s2.mark_complete()
    hub = Hub(similarity=False, corpus="dataset", lens_position="all")
    assert hub.requirements(view, dataset).positions == ["all"]
    result = hub.analyze(view, dataset, Stores(baseline=s2))
    assert result.summary["language lens position"] == "all"
    p = result.arrays["baseline/language_lens/p_language"]  # (layers, items, languages)
    langs, counts = count_tokens(LetterTokenizer(), hub.texts(dataset), 20)
    table = language_given_token(counts)
    for layer in (0, 3):
        for n in (0, 7):
            logits = ragged[f"lm.{layer}.out@all"][n] @ np.pad(8 * np.eye(20), ((0, 4), (0, 2)))
            lens = np.exp(logits[:, :20]) / np.exp(logits[:, :20]).sum(1, keepdims=True)
            np.testing.assert_allclose(p[layer, n], (lens @ table).mean(axis=0))  # mean over the positions
    rows = next(t for t in result.tables if t.title.startswith("Lens language distribution")).rows
    fr_text = next(r for r in rows if r["input_language"] == "fr" and r["modality"] == "text" and r["layer"] == 0)
    members = [n for n, it in enumerate(dataset) if it.labels["language"] == "fr" and it.labels["modality"] == "text"]
    group = p[0, members].mean(axis=0)
    assert fr_text["entropy"] == pytest.approx(entropy(group)) and fr_text["p_en"] == pytest.approx(group[0])
    assert 0.05 < fr_text["p_en"] < 0.5  # the English first position weighs in, the French rest dominates


def test_a_prefix_label_is_the_start_of_the_models_answer(tmp_path):
    dataset, _, view = _planted(tmp_path)
    view.default_prompt = lambda it: Prompt(user="Transcribe.")
    item = Stimulus("a", audio=np.zeros(160), sample_rate=16000, labels={"transcript": "Guten Tag", "language": "de"})
    assert Hub(prefix="transcript").prompt(view, item) == Prompt(user="Transcribe.", assistant_prefix="Guten Tag")
    assert Hub().prompt(view, item) == Prompt(user="Transcribe.")
    with pytest.raises(UserError, match="has no label 'transcript'"):
        Hub(prefix="transcript").check(dataset)
