"""The comparisons of one SVCCA run: cross-modal, cross-lingual, text vs speech of another language, and the
tables built on them (per resource level, the Fig. 5 gap table, the shared-token correlation)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from lalm_probe.core.errors import UserError
from lalm_probe.core.languages import label_code
from lalm_probe.core.results import Result, Table
from lalm_probe.core.view import ModelView
from lalm_probe.plugins.analyses import reps
from lalm_probe.plugins.analyses.svcca.plots import curve_plot, heatmaps
from lalm_probe.plugins.analyses.svcca.reader import Point, Reader, Score
from scipy import stats

if TYPE_CHECKING:  # pragma: no cover
    from lalm_probe.plugins.analyses.svcca.plugin import SVCCAAnalysis

NAMES = {"random": "random_baseline", "shuffled": "shuffled_baseline"}


class Comparisons:
    """The comparisons of one run (one store): tables, arrays and figures go into ``result``."""

    def __init__(self, spec: "SVCCAAnalysis", result: Result, run: str, index: dict, order: dict[str, int],
                 reader: Reader, points: dict[str, list], baselines: tuple[str, ...], items: list,
                 model: ModelView) -> None:
        self.spec, self.result, self.run, self.index, self.order = spec, result, run, index, order
        self.reader, self.points, self.baselines, self.items, self.model = reader, points, baselines, items, model

    # ---- helpers ----------------------------------------------------------------------------------------
    def note(self, text: str) -> None:
        if self.run == "baseline":
            self.result.notes.append(text)

    def groups(self, pairs: dict[Any, tuple[tuple, tuple]], what: str) -> dict[Any, tuple[list[str], list[str]]]:
        """Matched item ids per comparison with at least ``min_items`` sentences; cut to equal n on request."""
        out, sids = {}, {}
        for key, (a, b) in pairs.items():
            common, a_ids, b_ids = reps.matched_ids(self.index, a, b)
            if len(common) < self.spec.min_items:
                self.note(f"{what} {_name(key)}: only {len(common)} paired items; skipped.")
                continue
            ranked = sorted(zip(common, a_ids, b_ids), key=lambda t: self.order.get(t[0], 0))
            sids[key] = ranked
        n = min((len(v) for v in sids.values()), default=0)
        for key, ranked in sids.items():
            kept = ranked[:n] if self.spec.equal_n else ranked
            out[key] = ([a for _, a, _ in kept], [b for _, _, b in kept])
        if self.spec.equal_n and sids:
            self.note(f"equal_n: every {what} comparison is cut to its first {n} sentences in dataset order.")
        return out

    def score_row(self, s: Score) -> dict[str, float]:
        return {"svcca": s.similarity, **{NAMES[b]: getattr(s, b) for b in self.baselines}}

    def curve(self, scores: list[Score]) -> np.ndarray:
        """(points, [svcca, random_baseline, shuffled_baseline]); NaN where a baseline was not asked for."""
        return np.array([[s.similarity, s.random, s.shuffled] for s in scores]).reshape(len(scores), 3)

    def primary(self, arr: np.ndarray) -> np.ndarray:
        """The baseline the summary subtracts: the paper's random vectors where computed, else shuffled pairs."""
        col = 1 if "random" in self.baselines else 2 if "shuffled" in self.baselines else None
        return np.zeros(len(arr)) if col is None else np.nan_to_num(arr[:, col])

    def best(self, what: str, labels: list, arr: np.ndarray) -> None:
        gain = arr[:, 0] - self.primary(arr)
        if self.run != "baseline" or not np.isfinite(gain).any():
            return
        i = int(np.nanargmax(gain))
        self.result.summary[f"{what}: best layer (svcca - baseline)"] = labels[i]
        self.result.summary[f"{what}: svcca / baseline there"] = [arr[i, 0], float(self.primary(arr)[i])]
        if gain[i] <= 0:
            self.result.notes.append(f"{what}: SVCCA is at or below the baseline at every point (best difference "
                                     f"{gain[i]:+.3f}), so the same sentences are no more aligned than vectors "
                                     "without any relation; its 'best layer' is only the least bad one.")

    def modal_pairs(self) -> list[tuple[Point, Point]]:
        """Speech points paired with text points: in with in, layers by relative depth, out with out."""
        sp, tx = dict(self.points["speech"]), dict(self.points["text"])
        s_layers = [p for p in sp if isinstance(p, int)]
        t_layers = [p for p in tx if isinstance(p, int)]
        pairs = [("in", "in")] if "in" in sp and "in" in tx else []
        pairs += reps.pair_layers(len(s_layers), len(t_layers))
        return pairs + ([("out", "out")] if "out" in sp and "out" in tx else [])

    # ---- comparisons ------------------------------------------------------------------------------------
    def cross_modal(self) -> int:
        langs = sorted({lang for lang, m in self.index if m == "speech" and (lang, "text") in self.index})
        groups = self.groups({lang: ((lang, "speech"), (lang, "text")) for lang in langs}, "cross-modal")
        if not groups:
            return 0
        pairs = self.modal_pairs()
        scores: dict[str, list[Score]] = {lang: [] for lang in groups}
        rows = []
        for la, lb in pairs:  # point outer: each point is read once
            self.reader.clear()
            for lang, (a_ids, b_ids) in groups.items():
                s = self.reader.compare(("speech", la, a_ids), ("text", lb, b_ids))
                scores[lang].append(s)
                rows.append({"run": self.run, "language": lang, "layer": la, "text_layer": lb, "items": len(a_ids),
                             "k_speech": s.kx, "k_text": s.ky, **self.score_row(s)})
        rows.sort(key=lambda r: (r["language"], [p[0] for p in pairs].index(r["layer"])))
        labels = [p[0] for p in pairs]
        curves = {lang: self.curve(v) for lang, v in scores.items()}
        self.result.arrays[f"{self.run}/crossmodal/points"] = np.array([str(p) for p in labels])
        for lang, arr in curves.items():
            self.result.arrays[f"{self.run}/crossmodal/{lang}"] = arr  # (points, [svcca, random, shuffled])
            self.best(f"cross-modal {lang}", labels, arr)
        self.result.tables.append(Table(f"Cross-modal SVCCA per layer (speech vs text) ({self.run})", rows))
        self.result.figures[f"svcca_crossmodal_{self.run}"] = curve_plot(
            curves, labels, f"Cross-modal SVCCA, speech vs text ({self.run})",
            "layer" if pairs == [(p, p) for p, _ in pairs] else "speech-side layer", self.baselines)
        if self.spec.levels is not None:
            self.by_level(curves, labels)
        self.cm_scores = {lang: dict(zip(labels, v)) for lang, v in scores.items()}
        return len(curves)

    def by_level(self, curves: dict[str, np.ndarray], labels: list) -> None:
        """Fig. 2 (lower part): cross-modal curves averaged over the languages of each resource level."""
        table = self.spec._level_table()
        level = {lang: table.get(label_code(lang)) for lang in curves}
        missing = sorted(lang for lang, lv in level.items() if lv is None)
        if missing:
            self.note(f"levels: {', '.join(missing)} are not in the levels table and are averaged as 'unlisted'.")
        groups: dict[str, list[str]] = {}
        for lang, lv in level.items():
            groups.setdefault(lv or "unlisted", []).append(lang)
        means = {lv: np.mean([curves[lang] for lang in langs], axis=0) for lv, langs in sorted(groups.items())}
        self.result.tables.append(Table(f"Cross-modal SVCCA per layer by resource level ({self.run})", [
            {"run": self.run, "level": lv, "languages": len(groups[lv]), "layer": p,
             "svcca": arr[i, 0], **{NAMES[b]: arr[i, 1 + ("random", "shuffled").index(b)] for b in self.baselines}}
            for lv, arr in means.items() for i, p in enumerate(labels)]))
        for lv, arr in means.items():
            self.result.arrays[f"{self.run}/crossmodal_by_level/{lv}"] = arr
        self.result.figures[f"svcca_crossmodal_levels_{self.run}"] = curve_plot(
            {f"{lv} ({len(groups[lv])})": arr for lv, arr in means.items()}, labels,
            f"Cross-modal SVCCA by resource level ({self.run})", "layer", self.baselines)

    def cross_lingual(self) -> int:
        found = 0
        for modality in ("speech", "text"):
            langs = sorted(lang for lang, m in self.index if m == modality)
            groups = self.groups({(a, b): ((a, modality), (b, modality)) for i, a in enumerate(langs)
                                  for b in langs[i + 1:]}, f"cross-lingual {modality}")
            if not groups:
                continue
            found += len(groups)
            labels = [p for p, _ in self.points[modality]]
            sim = np.full((len(labels), len(langs), len(langs)), np.nan)
            base = {b: np.full_like(sim, np.nan) for b in self.baselines}
            rows = []
            for n, point in enumerate(labels):
                self.reader.clear()
                for (a, b), (a_ids, b_ids) in groups.items():
                    i, j = langs.index(a), langs.index(b)
                    s = self.reader.compare((modality, point, a_ids), (modality, point, b_ids))
                    sim[n, i, j] = sim[n, j, i] = s.similarity
                    for kind in self.baselines:
                        base[kind][n, i, j] = base[kind][n, j, i] = getattr(s, kind)
                    rows.append({"run": self.run, "modality": modality, "layer": point, "language_a": langs[i],
                                 "language_b": langs[j], "items": len(a_ids), "k_a": s.kx, "k_b": s.ky,
                                 **self.score_row(s)})
                np.fill_diagonal(sim[n], 1.0)
            key = f"{self.run}/crosslingual/{modality}"
            self.result.arrays[f"{key}/svcca"] = sim  # (points, languages, languages)
            for b, arr in base.items():
                self.result.arrays[f"{key}/{NAMES[b]}"] = arr
            self.result.arrays[f"{key}/languages"] = np.array(langs)
            self.result.arrays[f"{key}/points"] = np.array([str(p) for p in labels])
            self.result.tables.append(Table(f"Cross-lingual SVCCA per layer and language pair ({modality}) "
                                            f"({self.run})", rows, show=False))
            off = ~np.eye(len(langs), dtype=bool)
            mean = np.stack([_offdiag_mean(sim, off)] + [
                _offdiag_mean(base[b], off) if b in base else np.full(len(labels), np.nan)
                for b in ("random", "shuffled")], 1)
            self.result.tables.append(Table(f"Cross-lingual SVCCA, mean over language pairs ({modality}) "
                                            f"({self.run})", [{"layer": p, "svcca": mean[n, 0], **{
                                                NAMES[b]: mean[n, 1 + ("random", "shuffled").index(b)]
                                                for b in self.baselines}} for n, p in enumerate(labels)]))
            self.best(f"cross-lingual {modality}", labels, mean)
            self.result.figures[f"svcca_crosslingual_{modality}_{self.run}"] = curve_plot(
                {"mean over language pairs": mean}, labels, f"Cross-lingual SVCCA, {modality} ({self.run})", "layer",
                self.baselines)
            layer_idx = [n for n, p in enumerate(labels) if isinstance(p, int)]
            shown = reps.spread_layers(layer_idx, self.spec.heatmap_layers)
            self.result.figures[f"svcca_languages_{modality}_{self.run}"] = heatmaps(
                sim, langs, shown, f"Cross-lingual SVCCA between {modality} of each language pair ({self.run} run)",
                [str(labels[n]) for n in shown])
            if modality == "text":
                self.cl_text = {(a, b): (sim[:, langs.index(a), langs.index(b)], a_ids, b_ids)
                                for (a, b), (a_ids, b_ids) in groups.items()}
                self.cl_labels = labels
                if self.spec.token_overlap:
                    self.overlap()
        return found

    def mixed(self) -> int:
        """Text of language A vs speech of language B (A != B): the paper's "cross-lingual speech" of Fig. 5."""
        langs_t = sorted(lang for lang, m in self.index if m == "text")
        langs_s = sorted(lang for lang, m in self.index if m == "speech")
        groups = self.groups({(a, b): ((a, "text"), (b, "speech")) for a in langs_t for b in langs_s if a != b},
                             "text vs speech of another language")
        if not groups:
            return 0
        pairs = self.modal_pairs()
        sim = np.full((len(pairs), len(langs_t), len(langs_s)), np.nan)
        rows = []
        for n, (ls, lt) in enumerate(pairs):
            self.reader.clear()
            for (a, b), (t_ids, s_ids) in groups.items():
                s = self.reader.compare(("text", lt, t_ids), ("speech", ls, s_ids))
                sim[n, langs_t.index(a), langs_s.index(b)] = s.similarity
                rows.append({"run": self.run, "text_language": a, "speech_language": b, "layer": ls,
                             "text_layer": lt, "items": len(t_ids), **self.score_row(s)})
        self.result.arrays[f"{self.run}/text_vs_speech/svcca"] = sim  # (points, text languages, speech languages)
        self.result.arrays[f"{self.run}/text_vs_speech/text_languages"] = np.array(langs_t)
        self.result.arrays[f"{self.run}/text_vs_speech/speech_languages"] = np.array(langs_s)
        self.result.tables.append(Table(f"SVCCA, text of one language vs speech of another ({self.run})", rows,
                                        show=False))
        self.gap_table(pairs, sim, langs_t, langs_s)
        return len(groups)

    def gap_table(self, pairs: list, sim: np.ndarray, langs_t: list[str], langs_s: list[str]) -> None:
        """Fig. 5: for text of each language at one point, its SVCCA with its own speech (cross-modal), with its
        text translations and with their speech (ranges over the other languages)."""
        labels = [p for p, _ in pairs]
        want = self.spec.gap_point
        n = len(pairs) - 1 if want is None else next((k for k, p in enumerate(labels) if str(p) == want), None)
        if n is None:
            raise UserError(f"svcca: gap_point '{want}' is not a point here; points: {', '.join(map(str, labels))}.")
        ls, lt = pairs[n]
        own = getattr(self, "cm_scores", {})
        text = getattr(self, "cl_text", {})
        t_col = {p: k for k, p in enumerate(getattr(self, "cl_labels", []))}
        rows = []
        for i, a in enumerate(langs_t):
            row: dict[str, Any] = {"text_language": a, "layer": ls,
                                   "cross-modal (own speech)": own[a][ls].similarity if a in own else None}
            trans = [v[0][t_col[lt]] for k, v in text.items() if a in k and lt in t_col]
            speech = [sim[n, i, j] for j, b in enumerate(langs_s) if b != a and np.isfinite(sim[n, i, j])]
            for name, vals in (("cross-lingual text", trans), ("cross-lingual speech", speech)):
                row.update({f"{name} min": min(vals) if vals else None, f"{name} mean": float(np.mean(vals))
                            if vals else None, f"{name} max": max(vals) if vals else None})
            rows.append(row)
        self.result.tables.append(Table(f"Language gap vs modality gap at layer {ls} (text of each language; "
                                        f"Fig. 5) ({self.run})", rows))

    def overlap(self) -> None:
        """§3.2: Pearson r between the share of tokens parallel texts of two languages share and their cross-lingual
        text SVCCA at the first point (the input embeddings where ``inputs`` is given), over language pairs."""
        tok = self.model.tokenizer
        text_of = {it.id: it.text for it in self.items}
        point = self.cl_labels[0]
        rows = []
        for (a, b), (curve, a_ids, b_ids) in self.cl_text.items():
            shares = []
            for x, y in zip(a_ids, b_ids):
                if not (text_of.get(x) and text_of.get(y)):
                    continue
                ta, tb = (set(tok(text_of[i], add_special_tokens=False)["input_ids"]) for i in (x, y))
                shares.append(len(ta & tb) / max(1, len(ta | tb)))
            if shares:
                rows.append({"language_a": a, "language_b": b, "shared_tokens": float(np.mean(shares)),
                             "svcca": float(curve[0]), "sentences": len(shares)})
        self.result.tables.append(Table(f"Shared tokens vs cross-lingual text SVCCA at layer {point} ({self.run})",
                                        rows, show=len(rows) <= 12))
        x, y = np.array([r["shared_tokens"] for r in rows]), np.array([r["svcca"] for r in rows])
        ok = np.isfinite(y)
        if ok.sum() >= 3 and np.ptp(x[ok]) > 0 and np.ptp(y[ok]) > 0:
            r, p = stats.pearsonr(x[ok], y[ok])
        else:
            r, p = float("nan"), float("nan")
            self.note("token_overlap: fewer than 3 language pairs with varying values; no correlation.")
        if self.run == "baseline":
            self.result.summary[f"shared tokens vs text SVCCA at {point}: Pearson r, p ({int(ok.sum())} pairs)"] = [
                float(r), float(p)]


def _name(key: Any) -> str:
    return "-".join(map(str, key)) if isinstance(key, tuple) else str(key)


def _offdiag_mean(mats: np.ndarray, off: np.ndarray) -> np.ndarray:
    """Per point, the mean over computed language pairs (NaN where none was computed)."""
    vals = mats[:, off]
    ok = np.isfinite(vals)
    return np.where(ok.any(1), np.where(ok, vals, 0).sum(1) / np.maximum(ok.sum(1), 1), np.nan)
