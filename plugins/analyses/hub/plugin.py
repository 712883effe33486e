"""Semantic hub tests (Wu et al., ICLR 2025 = seed 004): shared representations across languages and modalities.

(a) Eq. 1 — baseline-adjusted cosine. For n matched pairs (same ``semantic_id``: speech vs its transcript, or
language A vs B) the n×n cosine matrix is built per layer; each pair's score is its cosine minus ONE global mean
over all non-matching (off-diagonal) pairs of that layer, as in the reference code. The layer score is the mean
over pairs with a 95% confidence interval: a t-interval over the per-pair scores (``ci=t``, default) or a
percentile bootstrap over pairs (``ci=bootstrap``, 2000 resamples, seeded). Both treat the baseline as fixed: it
averages n(n−1) cosines, so its sampling error is small next to the per-pair spread.

(b) Eq. 2 — token-language distribution under the logit lens. Token counts per language c(w, z) come from an
independent resource, not from the data analysed: by default (``corpus=wordfreq``) the ``wordfreq`` package's word
lists (42 languages, shipped offline on PyPI), whose ``table_words`` most frequent words per language are tokenized
by the model's tokenizer as in running text, each token counting its word's frequency (the paper counts tokens of
100,000 mC4 documents per language, which cannot ship offline). ``corpus=builtin`` (the built-in sentences),
``corpus=<file>`` (lines ``language<TAB>text`` or JSONL with ``language`` and ``text``) or, only on request,
``corpus=dataset`` (the dataset's own texts and transcripts: circular, the table then knows the very sentences it
scores) count tokens of text instead. ``log p(w|z) = log c(w,z) − log Σ_w c(w,z)``; ``p(z|w)`` = softmax over
languages with a UNIFORM prior, masking languages where w never occurs; tokens seen in no language get
1/|languages|. For a hidden state, ``p(z|h) = Σ_w p_lens(w|h) p(z|w)`` with ``p_lens`` the lens softmax truncated to
the tokenizer's base vocabulary (``tokenizer.vocab_size``, no added special tokens) and renormalised. Tokens are
counted without special tokens. The lens skips the final norm by default (``norm=false``), as the reference code
does for layers < L; the last layer is the normed state for both parts (HF's ``hidden_states[-1]``, which the
reference reads). The paper averages p(z|h_t) over every token position of its texts (Fig. 4):
``lens_position=all`` does (every position of each input, averaged per input, then over the inputs of a
group), ``all:text`` over the text's tokens only (no chat template or control tokens); by default each item
contributes its ``position`` state (``auto``: the last position on an LM / decoder, the mean over the valid
positions on an encoder). ``entropy`` is that of the group's distribution p^l(z) (``item_entropy``: the mean of
each input's). ``prefix=<label>`` gives the model the label's text as the start of its answer: Whisper's decoder
then reads the transcript after its control tokens, so ``prefix=transcript,lens_position=all:text`` reads the
decoder on the text of each clip, as the paper reads an LM on text. ``table_mass`` = Σ_w p_lens(w|h) over the
tokens the table has seen: where it is small, p(z|h) is mostly the uniform prior of unseen tokens, not evidence (Whisper's decoder at ``<|startoftranscript|>`` puts its mass on
language tokens, outside the base vocabulary).

Part (b) needs an unembedding: ``language_lens`` unset runs it where the stack has one (an LM / text decoder) and
skips it, with a note, on an encoder; ``language_lens=true`` on an encoder is an error. A model that takes speech
only (Whisper) has no text side: ``compare=[modality]`` alone is refused before collection and, beside
``language``, the cross-modal part is skipped with a note.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, ClassVar

import numpy as np
from lalm_probe.core.data import Dataset
from lalm_probe.core.errors import UserError
from lalm_probe.core.languages import label_code
from lalm_probe.core.model import Prompt
from lalm_probe.core.plugin import Analysis, Requirements, Stores
from lalm_probe.core.registry import hookimpl
from lalm_probe.core.results import Result, Table
from lalm_probe.core.threads import capped
from lalm_probe.core.view import ModelView
from lalm_probe.plugins.analyses import reps
from lalm_probe.plugins.analyses.hub.measure import (
    baseline_adjusted_cosine,
    builtin_texts,
    count_tokens,
    entropy,
    language_given_token,
    mean_ci,
    read_corpus,
    wordfreq_counts,
    wordfreq_languages,
)
from lalm_probe.plugins.analyses.hub.plots import lens_plot, similarity_plot
from scipy.special import softmax


# ---- the plugin ------------------------------------------------------------------------------------------
@dataclass
class Hub(Analysis):
    """Semantic hub: baseline-adjusted cosine of parallel items, and p(language | h) under the logit lens."""

    name: ClassVar[str] = "hub"
    description: ClassVar[str] = "Semantic hub: baseline-adjusted cosine (Eq. 1) and lens language distribution"

    stack: str | None = None  # default: the lens stack
    position: str = "auto"  # auto: last on an LM / decoder (the reference), mean on an encoder
    compare: list[str] = field(default_factory=lambda: ["modality", "language"])
    pairs: str = "dominant"  # cross-lingual pairs: each language vs the dominant one, or all pairs
    dominant: str = "en"
    ci: str = "t"  # t-interval or bootstrap over pairs
    similarity: bool = True  # part (a)
    language_lens: bool | None = None  # part (b); unset: on where the stack has an unembedding
    norm: bool = False  # apply the final norm in the lens (the reference does not)
    lens_position: str | None = None  # part (b): all (every position, averaged per input: the paper), all:text, ...
    prefix: str | None = None  # label whose text the model reads as the start of its answer (Whisper: transcript)
    corpus: str = "wordfreq"  # wordfreq | dataset | builtin | path to a language<TAB>text or JSONL file
    table_languages: list[str] | None = None  # the token table's languages (default: all wordfreq has, 42)
    table_words: int = 10000  # wordfreq: the most frequent words per language that are tokenized
    chunk: int = 64  # items projected at once
    seed: int = 0

    def __post_init__(self) -> None:
        if self.pairs not in ("dominant", "all"):
            raise UserError(f"hub: pairs must be 'dominant' or 'all', got '{self.pairs}'.")
        if self.ci not in ("t", "bootstrap"):
            raise UserError(f"hub: ci must be 't' or 'bootstrap', got '{self.ci}'.")
        if set(self.compare) - {"modality", "language"}:
            raise UserError(f"hub: compare takes 'modality' and/or 'language', got {self.compare}.")
        if not (self.similarity or self.language_lens is not False):
            raise UserError("hub: both parts are switched off (similarity=false, language_lens=false).")

    def _lens_on(self, model: ModelView, stack: str) -> bool:
        """Whether part (b) runs: as asked, or (unset) where the stack has an unembedding."""
        has = model.resolved[stack].unembed is not None
        if self.language_lens and not has:
            lens_stack = model.lens_stack
            raise UserError(f"hub: the language lens needs a stack with an unembedding and '{stack}' has none; "
                            "pass language_lens=false (or leave it unset) to compare representations only"
                            + (f", or stack={lens_stack} for the lens." if lens_stack else "."))
        return has if self.language_lens is None else bool(self.language_lens)

    def check(self, dataset: Dataset) -> None:
        if self.prefix:
            dataset.label_values(self.prefix)

    def prompt(self, model: ModelView, item: Any) -> Prompt:
        """The model's own prompt; with ``prefix``, the label's text as the start of the model's answer (Whisper's
        decoder then reads the transcript, token by token, after its language and task tokens)."""
        base = model.default_prompt(item)
        if not self.prefix:
            return base
        return Prompt(user=base.user, assistant_prefix=str(item.labels[self.prefix]))

    def _positions(self, model: ModelView, stack: str, lens: bool) -> tuple[str, str | None]:
        """The similarity position and, when it differs, where part (b) reads (``lens_position``)."""
        position = reps.resolve_position(model, stack, self.position)
        lens_at = self.lens_position if lens and self.lens_position not in (None, position) else None
        return position, lens_at

    def requirements(self, model: ModelView, dataset: Dataset) -> Requirements:
        stack = reps.resolve_stack(model, self.stack)
        reps.layer_sites(model, stack, "out")
        lens = self._lens_on(model, stack)  # raises when asked for on a stack without an unembedding
        if not (self.similarity or lens):
            raise UserError(f"hub: nothing to compute: similarity=false and '{stack}' has no unembedding for "
                            "the language lens.")
        if self.similarity and self.compare == ["modality"]:
            problem = reps.text_side_missing(model, dataset)
            if problem:
                raise UserError(f"hub: compare=[modality] scores speech against the text of the same sentences, "
                                f"but {problem}. Use compare=[language] for speech vs speech across languages.")
        labels = ["language"] + (["semantic_id"] if self.similarity else [])
        position, lens_at = self._positions(model, stack, lens)
        positions = ([position] if self.similarity or not lens_at else []) + ([lens_at] if lens_at else [])
        return Requirements(sites=[f"{stack}.*.out"], positions=positions, labels=labels)

    @capped
    def analyze(self, model: ModelView, dataset: Dataset, stores: Stores) -> Result:
        stack = reps.resolve_stack(model, self.stack)
        layers = [layer for layer, _ in reps.layer_sites(model, stack, "out")]
        lens = self._lens_on(model, stack)
        position, lens_at = self._positions(model, stack, lens)
        result = Result(summary={"stack": stack, "position": position, "language lens": lens})
        if lens:
            result.summary["language lens position"] = lens_at or position
        if model.resolved[stack].final_norm is not None and (self.similarity or lens):
            result.notes.append(f"The last layer ({layers[-1]}) is read after '{stack}''s final norm, as HF's "
                                "hidden_states[-1] (what the semantic-hub code reads) is; the other layers are block "
                                "outputs.")
        if lens:
            result.summary["lens final norm"] = self.norm
        elif self.language_lens is None:
            result.notes.append(f"Language lens (part b) skipped: '{stack}' has no unembedding to read tokens "
                                "from; only the baseline-adjusted cosine (part a) is computed.")
        if self.position == "auto" and position == "mean":
            result.notes.append(reps.auto_position_note(stack, position))
        if self.similarity and "modality" in self.compare:
            problem = reps.text_side_missing(model, dataset)
            if problem:
                result.notes.append(f"Cross-modal (speech vs text) comparisons skipped: {problem}.")
        table = self._token_table(model, dataset, result) if lens else None
        for run, store in stores.activations():
            first = position if self.similarity or not lens_at else lens_at
            items = reps.items_reaching(dataset, store, stack, f"{stack}.{layers[0]}.out@{first}",
                                        result.notes if run == "baseline" else None)
            ids = [it.id for it in items]
            pairs = self._pairs(items, result, run) if self.similarity else []
            scores = {name: np.zeros((len(layers), 5)) for name, _, _ in pairs}  # mean, lo, hi, matched, off
            probs = np.zeros((len(layers), len(items), len(table[0]))) if table else None
            mass = np.zeros((len(layers), len(items))) if table else None
            for li, layer in enumerate(layers):  # one layer in memory at a time
                x = reps.load_layer(store, f"{stack}.{layer}.out", position, ids) if (
                    pairs or (table is not None and not lens_at)) else None
                # the reference reads HF hidden_states, whose last entry is after the final norm
                xs = model.final_norm(x, stack) if pairs and layer == layers[-1] else x
                for name, ra, rb in pairs:
                    per_pair, off = baseline_adjusted_cosine(xs[ra], xs[rb])
                    m, lo, hi = mean_ci(per_pair, method=self.ci, seed=self.seed)
                    scores[name][li] = m, lo, hi, m + off, off
                if table is not None and lens_at:
                    probs[li], mass[li] = self._lens_every_position(model, stack, layer, store, ids, lens_at, table)
                elif table is not None:
                    probs[li], mass[li] = self._lens_probs(model, stack, layer, x, table[1], table[2])
            if pairs:
                self._report_similarity(result, run, scores, {n: len(ra) for n, ra, _ in pairs}, layers)
            if table is not None:
                self._report_lens(result, run, items, probs, mass, table[0], layers)
        return result

    # ---- (a) --------------------------------------------------------------------------------------------
    def comparisons(self, index: dict[tuple[str, str], dict[str, str]]) -> list[tuple[str, tuple, tuple]]:
        """(name, group a, group b) for every comparison the options ask for, groups = (language, modality)."""
        out = []
        langs = sorted({lang for lang, _ in index})
        if "modality" in self.compare:
            out += [(f"{lang}: speech vs text", (lang, "speech"), (lang, "text")) for lang in langs
                    if (lang, "speech") in index and (lang, "text") in index]
        if "language" in self.compare:
            for mod in ("speech", "text"):
                have = [lang for lang in langs if (lang, mod) in index]
                if self.pairs == "dominant" and self.dominant in have:
                    pairs = [(lang, self.dominant) for lang in have if lang != self.dominant]
                else:
                    pairs = [(a, b) for i, a in enumerate(have) for b in have[i + 1:]]
                out += [(f"{mod}: {a} vs {b}", (a, mod), (b, mod)) for a, b in pairs]
        return out

    def _pairs(self, items: list, result: Result, run: str) -> list[tuple[str, list[int], list[int]]]:
        """Every comparison as (name, rows of side a, rows of side b), rows matched by semantic id."""
        index, dropped = reps.parallel_index(items)
        if dropped and run == "baseline":
            result.notes.append(f"{dropped} repeated items (same sentence, language and modality) were left out "
                                "of the pairs; the first of each stands for the sentence.")
        row_of = {it.id: n for n, it in enumerate(items)}
        out = []
        for name, a, b in self.comparisons(index):
            _, a_ids, b_ids = reps.matched_ids(index, a, b)
            if len(a_ids) >= 2:
                out.append((name, [row_of[i] for i in a_ids], [row_of[i] for i in b_ids]))
        if not out:
            raise UserError("hub: no matched pairs — no two groups (speech/text of one language, or two languages) "
                            "share at least 2 semantic ids; check the semantic_id, language and modality labels.")
        return out

    def _report_similarity(self, result: Result, run: str, curves: dict[str, np.ndarray], sizes: dict[str, int],
                           layers: list) -> None:
        rows = [{"run": run, "comparison": name, "layer": layer, "pairs": sizes[name], "matched_cos": c[li, 3],
                 "nonmatched_cos": c[li, 4], "score": c[li, 0], "ci_low": c[li, 1], "ci_high": c[li, 2]}
                for name, c in curves.items() for li, layer in enumerate(layers)]
        for name, c in curves.items():
            result.arrays[f"{run}/similarity/{name}"] = c[:, :3]  # (layers, [mean, ci_low, ci_high])
            result.arrays[f"{run}/raw_cosine/{name}"] = c[:, 3:]  # (layers, [matched, non-matched mean])
        result.tables.append(Table(f"Baseline-adjusted cosine per layer, 95% CI ({self.ci}) ({run})", rows,
                                   show=len(curves) <= 2))
        mean = np.mean([c[:, 0] for c in curves.values()], axis=0)
        result.tables.append(Table(f"Baseline-adjusted cosine per layer, by comparison ({run})",
                                   [{"layer": layer, **{n: c[li, 0] for n, c in curves.items()}, "mean": mean[li]}
                                    for li, layer in enumerate(layers)], show=2 < len(curves) <= 8))
        if run == "baseline":
            best = int(np.argmax(mean))
            result.summary["similarity: comparisons"] = len(curves)
            result.summary["similarity: best layer (mean over comparisons)"] = layers[best]
            result.summary["similarity: adjusted cosine there"] = float(mean[best])
        result.figures[f"hub_similarity_{run}"] = similarity_plot(curves, layers, run)

    # ---- (b) --------------------------------------------------------------------------------------------
    def texts(self, dataset: Dataset) -> dict[str, list[str]]:
        """Text per language for a token table counted from text (``corpus`` = dataset, builtin or a file).

        ``dataset``: the dataset's own texts and transcripts (circular: the table then knows the very sentences
        it scores, so only on request); ``builtin``: the built-in sentences of every language.
        """
        if self.corpus == "builtin":
            return builtin_texts()
        if self.corpus != "dataset":
            return read_corpus(self.corpus)
        out: dict[str, list[str]] = {}
        for it in dataset:
            text = it.text or it.labels.get("transcript")
            if text and "language" in it.labels:
                out.setdefault(str(it.labels["language"]), []).append(str(text))
        return {k: list(dict.fromkeys(v)) for k, v in out.items()}  # a sentence counts once per language

    def _token_table(self, model: ModelView, dataset: Dataset, result: Result
                     ) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Languages, p(language | token) and which tokens the table has seen at all."""
        tok = model.tokenizer
        vocab = int(getattr(tok, "vocab_size", 0) or len(tok))
        if self.corpus == "wordfreq":
            langs = [label_code(x) for x in self.table_languages] if self.table_languages else wordfreq_languages()
            unknown = sorted(set(langs) - set(wordfreq_languages()))
            if unknown:
                raise UserError(f"hub: wordfreq has no word list for {', '.join(unknown)}; it has: "
                                f"{', '.join(wordfreq_languages())}.")
            langs, counts = wordfreq_counts(tok, langs, vocab, self.table_words)
            result.summary["token table: source"] = (f"wordfreq {_version('wordfreq')}: the {self.table_words} most "
                                                     "frequent words per language, weighted by frequency")
        else:
            texts = self.texts(dataset)
            langs, counts = count_tokens(tok, texts, vocab)
            result.summary["token table: source"] = (self.corpus if self.corpus in ("dataset", "builtin")
                                                     else f"file {self.corpus}")
        if len(langs) < 2:
            raise UserError(f"hub: the token-language table needs text in at least two languages; found "
                            f"{', '.join(langs) or 'none'}. Use corpus=wordfreq, corpus=builtin or corpus=<file>.")
        result.summary["token table: languages"] = langs
        result.summary["token table: " + ("tokens counted" if self.corpus != "wordfreq" else
                                          "frequency-weighted tokens")] = float(counts.sum())
        result.arrays["token_table/counts_per_language"] = counts.sum(axis=0)
        if _column(langs, self.dominant) is None:
            result.notes.append(f"The dominant language '{self.dominant}' is not in the token table, "
                                "so p(dominant | h) is not reported.")
        return langs, language_given_token(counts), counts.sum(axis=1) > 0

    def _lens_probs(self, model: ModelView, stack: str, layer: Any, x: np.ndarray, p_tok: np.ndarray,
                    seen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """p(language | h) for every row of x and the lens mass on tokens the table has seen (``table_mass``),
        projecting ``chunk`` rows at a time (vocabularies are large)."""
        out, mass = np.zeros((len(x), p_tok.shape[1])), np.zeros(len(x))
        for start in range(0, len(x), self.chunk):
            logits = model.lens(x[start:start + self.chunk], stack, self.norm,
                                layer if isinstance(layer, int) else None)
            logits = logits.detach().float().cpu().numpy() if hasattr(logits, "detach") else np.asarray(logits)
            # an unembedding narrower than the tokenizer cannot predict the extra tokens: drop them from the table
            v = min(logits.shape[-1], p_tok.shape[0])
            p_lens = softmax(np.asarray(logits, dtype=np.float64)[..., :v], axis=-1)  # language_given_hidden's
            out[start:start + self.chunk] = p_lens @ p_tok[:v]
            mass[start:start + self.chunk] = p_lens @ seen[:v].astype(np.float64)
        return out, mass

    def _lens_every_position(self, model: ModelView, stack: str, layer: int, store: Any, ids: list[str],
                             where: str, table: tuple) -> tuple[np.ndarray, np.ndarray]:
        """p(language | h) at every position of each input (``all`` or ``all:<span>``), averaged per input (the
        paper averages over the tokens of its texts), and the lens mass on counted tokens, likewise."""
        rows = store.ragged(f"{stack}.{layer}.out@{where}", ids)
        p, m = self._lens_probs(model, stack, layer, np.concatenate(rows), table[1], table[2])
        cuts = np.cumsum([len(r) for r in rows])[:-1]
        return (np.stack([part.mean(axis=0) for part in np.split(p, cuts)]),
                np.array([part.mean() for part in np.split(m, cuts)]))

    def _report_lens(self, result: Result, run: str, items: list, probs: np.ndarray, mass: np.ndarray,
                     langs: list[str], layers: list) -> None:
        result.arrays[f"{run}/language_lens/p_language"] = probs  # (layers, items, languages)
        result.arrays[f"{run}/language_lens/table_mass"] = mass  # (layers, items): lens mass on counted tokens
        if run == "baseline":
            per_layer = mass.mean(axis=1)
            result.summary["lens mass on counted tokens (min, max over layers)"] = [float(per_layer.min()),
                                                                                    float(per_layer.max())]
            if per_layer.max() < 0.1:
                result.notes.append(f"Under the lens at most {per_layer.max():.1%} of the probability (mean over "
                                    "items, per layer) falls on tokens the token table has seen, so p(language | h) "
                                    "stays near the uniform prior of unseen tokens and is not evidence; pass "
                                    "corpus=<file> with more text, or read a position where the model predicts "
                                    "words (e.g. after a forced language prompt).")
        result.arrays["token_table/languages"] = np.array(langs)
        col = {lang: j for lang in {str(it.labels.get("language")) for it in items}
               if (j := _column(langs, lang)) is not None}
        dom = _column(langs, self.dominant)
        nan = np.full(len(layers), np.nan)
        groups: dict[tuple[str, str], list[int]] = {}
        for n, it in enumerate(items):
            groups.setdefault((reps.modality_of(it), str(it.labels.get("language"))), []).append(n)
        rows, curves = [], {}
        for (mod, lang), members in sorted(groups.items()):
            p = probs[:, members]  # (layers, members, languages)
            p_in = p[:, :, col[lang]].mean(axis=1) if lang in col else nan
            p_dom = p[:, :, dom].mean(axis=1) if dom is not None else nan
            ent = entropy(p.mean(axis=1))  # of the group's language distribution p^l(z), as Fig. 4 reads it
            item_ent = entropy(p).mean(axis=1)
            top = p.mean(axis=1).argmax(axis=-1)
            covered = mass[:, members].mean(axis=1)
            curves[(mod, lang)] = (p_in, p_dom)
            rows += [{"run": run, "modality": mod, "input_language": lang, "layer": layer, "items": len(members),
                      "p_input": p_in[li], f"p_{self.dominant}": p_dom[li], "entropy": ent[li],
                      "item_entropy": item_ent[li],
                      "top_language": langs[int(top[li])], "table_mass": covered[li]}
                     for li, layer in enumerate(layers)]
        result.tables.append(Table(f"Lens language distribution p(language | h) per layer ({run})", rows,
                                   show=len(groups) <= 2))
        if len(groups) > 2:  # a compact view: own-language vs dominant-language probability per modality
            compact = []
            for li, layer in enumerate(layers):
                row: dict[str, Any] = {"layer": layer}
                for mod in sorted({m for m, _ in groups}):
                    own = [curves[(m, lang)][0][li] for m, lang in curves if m == mod and lang in col]
                    dom_p = [curves[(m, lang)][1][li] for m, lang in curves if m == mod and lang != self.dominant]
                    row[f"{mod}: p(input lang)"] = float(np.mean(own)) if own else float("nan")
                    row[f"{mod}: p({self.dominant}), other inputs"] = float(np.mean(dom_p)) if dom_p else float("nan")
                compact.append(row)
            result.tables.append(Table(f"Lens language probability per layer, mean over input languages ({run})",
                                       compact))
        if run == "baseline" and dom is not None:
            for mod in sorted({m for m, _ in groups}):
                others = [n for n, it in enumerate(items) if reps.modality_of(it) == mod
                          and str(it.labels.get("language")) != self.dominant]
                if others:
                    curve = probs[:, others, dom].mean(axis=1)
                    best = int(np.argmax(curve))
                    result.summary[f"p({self.dominant}|h), non-{self.dominant} {mod} input: peak layer"] = layers[best]
                    result.summary[f"p({self.dominant}|h), non-{self.dominant} {mod} input: peak value"] = float(
                        curve[best])
        result.figures[f"hub_language_lens_{run}"] = lens_plot(curves, layers, self.dominant, run)



def _column(langs: list[str], label: str) -> int | None:
    """The token-table column of a language label, in the label's spelling or the table's (``deu`` -> ``de``)."""
    for key in (label, label_code(label)):
        if key in langs:
            return langs.index(key)
    return None


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "?"


@hookimpl
def lalm_probe_analyses() -> list[type]:
    return [Hub]
