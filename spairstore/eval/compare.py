"""Paired comparison of two sets of predictions: PCK difference with bootstrap confidence intervals.

Both are scored on the same pairs under the same protocol; the difference ``A - B`` (percentage points)
is reported overall, per category, per group of the store's groupings (AP-10K: family, subset) and per
variation-factor level, per image and per point. Its
uncertainty comes from a paired bootstrap over *pairs*: ``resamples`` times, the evaluated pairs are drawn
with replacement (``numpy.random.default_rng(seed)``), and A and B are re-scored on the same draw; the
interval is the central ``confidence`` % of those differences (percentile method), the p-value the two-sided
bootstrap one, ``min(1, 2 · (min(#(d* <= 0), #(d* >= 0)) + 1) / (R + 1))`` (never 0: its resolution is
``2 / (R + 1)``). Identical inputs give exactly 0, an interval [0, 0] and p = 1. A group of fewer than
``min_pairs`` pairs (:data:`MIN_PAIRS` unless given) gets its difference but no interval or p-value: the
bootstrap of a handful of pairs only shows their spread, so one pair, or two that gained alike, would read
as certain (p = 2 / (R + 1)).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..core.errors import SpairstoreError
from ..core.schema import LEVELS
from ..core.tables import cell, text_table
from ..store.reader import Store
from .evaluation import Predictions, Report, score, select_pairs, table_split
from .predictions import all_predictions
from .protocols import Protocol, alpha_key, get_protocol
from .provenance import describe, method_provenance

#: Fewest pairs a group needs for an interval and a p-value (:func:`compare`'s ``min_pairs``).
MIN_PAIRS = 10


def _groups(rep: Report) -> list[tuple[str, str, np.ndarray]]:
    """(section, group name, bool (P,) membership): overall, each category, each group of the store's
    groupings (AP-10K: family, subset), each factor level."""
    out = [("overall", "all", np.ones(rep.pairs, dtype=bool))]
    out += [("by_category", c, rep.category == j) for j, c in enumerate(rep.categories) if (rep.category == j).any()]
    for kind, (ids, names) in rep.groups.items():
        out += [(f"by_group/{kind}", g, ids == j) for j, g in enumerate(names) if (ids == j).any()]
    for f, lab in rep.labels.items():
        if (lab >= 0).any():
            out += [(f"by_factor/{f}", lv, lab == i) for i, lv in enumerate(LEVELS[f]) if (lab == i).any()]
    return out


@dataclass
class Comparison:
    """The result of :func:`compare`; :meth:`to_dict` is the JSON contract."""

    protocol: Protocol
    split: str
    names: tuple[str, str]
    pairs: int
    resamples: int
    seed: int
    confidence: float
    min_pairs: int
    cells: dict[str, dict[str, dict[str, dict[str, dict[str, Any]]]]]  # section -> group -> alpha -> agg -> cell
    #: spairstore version, store fingerprint, and per side (``a``, ``b``) the feature sets it read (name ->
    #: provenance) and a head's file and SHA-256
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """``{"protocol", "protocol_line", "split", "a", "b", "pairs", "resamples", "seed", "confidence",
        "min_pairs", "provenance", "overall": {"all": {alpha: {aggregation: {"a", "b", "diff", "ci": [lo, hi], "p",
        "pairs"}}}}, "by_category": {...}, "by_group": {grouping: {group: {...}}}, "by_factor": {factor: {level:
        {...}}}}``; PCK and differences in percent, ``pairs`` the group's pairs scored (``ci`` and ``p`` null
        below ``min_pairs``)."""
        out: dict[str, Any] = {"protocol": self.protocol.to_dict(), "protocol_line": str(self.protocol),
                               "split": self.split, "a": self.names[0], "b": self.names[1], "pairs": self.pairs,
                               "resamples": self.resamples, "seed": self.seed, "confidence": self.confidence,
                               "min_pairs": self.min_pairs, "provenance": self.provenance,
                               "overall": {}, "by_category": {}, "by_group": {}, "by_factor": {}}
        for section, groups in self.cells.items():
            if "/" in section:
                kind, name = section.split("/", 1)
                out[kind][name] = groups
            else:
                out[section] = groups
        return out

    def to_text(self, alpha: float | None = None) -> str:
        a = alpha_key(self.protocol.alphas[0] if alpha is None else alpha)
        cols = [("", "pairs")] + [(agg.replace("_", " "), n) for agg in self.protocol.aggregation
                                  for n in ("A", "B", "A-B", "ci lo", "ci hi", "p")]
        rows = []
        for section, groups in self.cells.items():
            prefix = "" if section in ("overall", "by_category") else section.split("/", 1)[1] + " "
            for g, cells in groups.items():
                vals: list[float | int | str | None] = [cells[a][self.protocol.aggregation[0]]["pairs"]]
                for agg in self.protocol.aggregation:
                    c = cells[a][agg]  # p is a probability, not a percentage: three decimals (it is never 0)
                    vals += [c["a"], c["b"], c["diff"], c["ci"][0], c["ci"][1], None if c["p"] is None else f"{c['p']:.3f}"]
                rows.append((prefix + g, vals))
        made = self.provenance
        sets = "".join(describe(made.get(side, {}), f"{side.upper()} reads ") for side in ("a", "b"))
        head = (f"A = {self.names[0]}\nB = {self.names[1]}\n{self.protocol}\n{self.split}: {self.pairs:,} pairs; paired "
                f"bootstrap over pairs, {self.resamples:,} resamples, seed {self.seed}, {self.confidence:g} % interval "
                f"(none for a group of fewer than {self.min_pairs} pairs)"
                + sets + (f"\nspairstore {made['spairstore']}, store fingerprint {made['store_fingerprint']}" if made else ""))
        return head + "\n\n" + text_table(f"PCK@{a} (%): A, B, difference A - B (points), its interval, p-value", cols, rows)

    def render(self, fmt: str = "text") -> str:
        if fmt == "json":
            return json.dumps(self.to_dict(), indent=2)
        if fmt == "text":
            return self.to_text()
        raise ValueError(f"unknown format {fmt!r} (text or json)")

    def __str__(self) -> str:
        return self.to_text()

    def __repr__(self) -> str:
        a, agg = alpha_key(self.protocol.alphas[0]), self.protocol.aggregation[0]
        c = self.cells["overall"]["all"][a][agg]
        ci = "" if c["p"] is None else f" [{c['ci'][0]:.1f}, {c['ci'][1]:.1f}], p {c['p']:.3f}"
        return (f"<Comparison {self.split}, protocol {self.protocol.name}: {self.pairs:,} pairs, PCK@{a} "
                f"{agg.replace('_', ' ')} {self.names[0]} - {self.names[1]} {cell(c['diff'])}{ci}>")

    def _repr_markdown_(self) -> str:
        return f"```\n{self.to_text()}\n```"


def compare(store: Store, split: str, a: Predictions, b: Predictions, protocol: str | Protocol | None = None,
            resamples: int = 1000, seed: int = 0, confidence: float = 95.0,
            names: tuple[str, str] = ("A", "B"), min_pairs: int | None = None) -> Comparison:
    """PCK of ``a`` minus that of ``b`` (each predictions or a method, as :func:`~spairstore.eval.evaluation.evaluate`
    takes) on the pairs ``protocol`` selects, with paired bootstrap intervals for groups of at least
    ``min_pairs`` pairs (None: :data:`MIN_PAIRS`; see the module docstring)."""
    min_pairs = MIN_PAIRS if min_pairs is None else min_pairs
    if resamples < 1:
        raise SpairstoreError(f"resamples must be a positive number, got {resamples}")
    if min_pairs < 1:
        raise SpairstoreError(f"min_pairs must be a positive number, got {min_pairs}")
    if not 0 < confidence < 100:
        raise SpairstoreError(f"confidence must be a percentage between 0 and 100, got {confidence}")
    proto = get_protocol(protocol, store.dataset)
    split = table_split(store, split, proto)
    rows = select_pairs(store, split, proto)
    reps = [score(store, split, rows, all_predictions(store, split, p, proto.direction)[rows], proto) for p in (a, b)]
    nv = reps[0].valid.sum(-1).astype(np.float64)  # the same keypoints in both (same pairs, same subset)
    has = nv > 0
    nc = [r.correct.sum(-1).astype(np.float64) for r in reps]  # (A, P) each
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = [np.where(has, c / nv, 0.0) for c in nc]
    groups = _groups(reps[0])
    member = np.stack([g for _, _, g in groups], 1).astype(np.float64)  # (P, G)
    scored = (member * has[:, None]).sum(0).astype(int)  # pairs of each group with keypoints to score
    P = reps[0].pairs
    rng = np.random.default_rng(seed)
    # Each resample's multiplicity of every pair: (R, P), from R draws of P pairs with replacement.
    draws = rng.integers(0, P, size=(resamples, P)) + np.arange(resamples)[:, None] * P
    weight = np.bincount(draws.ravel(), minlength=resamples * P).reshape(resamples, P).astype(np.float64)
    del draws
    ones = np.ones((1, P))

    def stat(w: np.ndarray, num: np.ndarray, den: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return (w @ (member * num[:, None])) / (w @ (member * den[:, None])) * 100

    lo_q, hi_q = (100 - confidence) / 2, 100 - (100 - confidence) / 2
    cells: dict[str, dict[str, dict[str, dict[str, dict[str, Any]]]]] = {}
    for i, alpha in enumerate(proto.alphas):
        per_agg = {"per_image": (frac[0][i], frac[1][i], has.astype(np.float64)),
                   "per_point": (nc[0][i], nc[1][i], nv)}
        for agg in proto.aggregation:
            xa, xb, den = per_agg[agg]
            pa, pb = stat(ones, xa, den)[0], stat(ones, xb, den)[0]
            diff = stat(ones, xa - xb, den)[0]
            boot = stat(weight, xa - xb, den)  # (R, G)
            for k, (section, name, _) in enumerate(groups):
                col = boot[:, k][np.isfinite(boot[:, k])]
                ok = np.isfinite(diff[k]) and len(col) and scored[k] >= min_pairs
                cell = {"a": _num(pa[k]), "b": _num(pb[k]), "diff": _num(diff[k]), "pairs": int(scored[k]),
                        "ci": [float(np.percentile(col, lo_q)), float(np.percentile(col, hi_q))] if ok else [None, None],
                        "p": float(min(1.0, 2 * (min((col <= 0).sum(), (col >= 0).sum()) + 1) / (len(col) + 1)))
                        if ok else None}
                cells.setdefault(section, {}).setdefault(name, {}).setdefault(alpha_key(alpha), {})[agg] = cell
    made: dict[str, Any] = {}
    for side, m in (("a", a), ("b", b)):
        one = method_provenance(store, m)
        made.update({k: one.pop(k) for k in ("spairstore", "store_fingerprint")})
        made[side] = one
    return Comparison(proto, split, names, P, resamples, seed, confidence, min_pairs, cells, made)


def _num(v: float) -> float | None:
    return None if not np.isfinite(v) else float(v)
