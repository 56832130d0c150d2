"""PCK evaluation: :func:`evaluate` scores predictions under a named :class:`~spairstore.eval.protocols.Protocol`.

Everything is vectorised over all pairs of a split: keypoints are the split's padded ``(P, M, 2)`` table,
so 12k pairs at three α with every breakdown take milliseconds. A :class:`Report` holds the per-keypoint
results and renders the dataset paper's tables (per category; by viewpoint, scale, truncation and
occlusion; the controlled analysis) as terminal text, Markdown, CSV or JSON, plus a table per grouping
the store declares (each pair subset of ``subset_names``; the groups of each ``category_groups``
grouping, e.g. AP-10K's families) and the SHA-256 of the pair list evaluated.
"""
from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np

from ..core.errors import StoreError
from ..core.records import pair_list_sha256
from ..core.schema import LEVELS
from ..core.tables import cell, markdown_table, text_table
from ..store.reader import Store
from .methods import Method
from .predictions import PredictionsError, load_predictions, predictions_about
from .protocols import Protocol, alpha_key, get_protocol
from .provenance import describe, method_provenance, provenance

#: Predictions in the original pixels of the predicted-in image (the target for src->trg): a padded
#: ``(P, M, 2)`` array with one row per pair of the split in table order, a flat ``(sum n_kps, 2)``
#: array, a mapping pair id -> ``(n, 2)``, a ``.npz``/``.pt``/``.npy`` file, or a method that makes them.
Predictions = Union[np.ndarray, Mapping[int, Any], str, Path, Method, Callable[..., np.ndarray]]

#: Truncation/occlusion labels of the reversed pair: "src" (1) and "trg" (2) swap.
_SWAP_SIDES = np.array([0, 2, 1, 3], dtype=np.int8)
_SIDED = ("truncation", "occlusion")


def table_split(store: Store, split: str, protocol: Protocol) -> str:
    """The pair table the protocol scores for ``split``: itself, or SPair-U's ``<split>-unseen``."""
    if protocol.keypoint_set == "annotated" or split.endswith("-unseen"):
        return split
    name = f"{split}-unseen"
    if name not in store.splits or "extra_keypoints" not in store.images:
        raise StoreError(f"{store.path}: no SPair-U layer for split {split!r} (split {name!r}); pack a root "
                         "holding ExtraImageAnnotation/ and ExtraPairAnnotation/")
    return name


def select_pairs(store: Store, split: str, protocol: Protocol) -> np.ndarray:
    """Pair rows of ``split`` the protocol evaluates: every row, ascending, or ``subsample`` per category.

    ``sampling="rng"``: drawn without replacement by ``numpy.random.default_rng(seed)``, categories in
    index order, rows ascending. ``sampling="geoaware-sc"``: GeoAware-SC's draw exactly -- per category
    (index order) its pairs sorted by file name (``<stem>.json``, as its ``sorted(glob(...))``), then
    ``np.random.seed(seed); np.random.choice(n, subsample)``: with replacement, so a row may repeat; rows
    in drawn order."""
    table = store.pairs(split)
    if protocol.subsample is None:
        return np.arange(table.rows)
    picked = []
    if protocol.sampling == "geoaware-sc":
        stems = np.array([f"{s}.json" for s in table.stem.astype(str)])
        for c in np.unique(table.category):
            rows = np.flatnonzero(table.category == c)
            rows = rows[np.argsort(stems[rows], kind="stable")]
            legacy = np.random.RandomState(protocol.seed)  # what np.random.seed(seed) sets up
            picked.append(rows[legacy.choice(len(rows), protocol.subsample)])
        return np.concatenate(picked) if picked else np.arange(0)
    rng = np.random.default_rng(protocol.seed)
    for c in np.unique(table.category):
        rows = np.flatnonzero(table.category == c)
        picked.append(rows if len(rows) <= protocol.subsample else rng.choice(rows, protocol.subsample, replace=False))
    return np.sort(np.concatenate(picked)) if picked else np.arange(0)


def evaluate(store: Store | str | Path, split: str, predictions: Predictions,
             protocol: str | Protocol | None = None, dagger: bool = False) -> Report:
    """PCK of ``predictions`` on ``split`` under ``protocol`` (by default the one the store's dataset implies).

    ``predictions`` are keypoints in *original pixels* of the image they are predicted in (the target
    image for ``src->trg``), one per pair keypoint in the pair's keypoint order; see :data:`Predictions`.
    A method (e.g. :class:`~spairstore.eval.methods.Identity`) is run on exactly the pairs evaluated.
    A prediction that is NaN counts as wrong. ``dagger`` also computes PCK† (:func:`score`).
    """
    if not isinstance(store, Store):
        from ..store.reader import open as open_store

        store = open_store(store)
    proto = get_protocol(protocol, store.dataset)
    split = table_split(store, split, proto)
    rows = select_pairs(store, split, proto)
    if callable(predictions):
        method = getattr(predictions, "name", getattr(predictions, "__name__", "method"))
        pred = np.asarray(predictions(store, split, rows, proto.direction), dtype=np.float64)
    else:
        method = str(predictions) if isinstance(predictions, (str, Path)) else None
        pred = load_predictions(predictions, store, split, proto.direction)[rows]
    made = method_provenance(store, predictions)
    about = predictions_about(predictions)
    if about is not None and about.get("method") and "made_by" in about:  # saved from a method: what it was
        made["predictions"] = {"method": about.get("method"), **about["made_by"]}
    return score(store, split, rows, pred, proto, method=method, dagger=dagger, made=made)


def score(store: Store, split: str, rows: np.ndarray, pred: np.ndarray, protocol: Protocol,
          method: str | None = None, dagger: bool = False, made: dict[str, Any] | None = None) -> Report:
    """Score ``pred`` (float (len(rows), M, 2), original pixels of the predicted-in image) for pair ``rows``.

    With ``keypoints="geo-aware"`` only that subset is scored (:func:`~spairstore.eval.subsets.geo_aware_mask`),
    on the pairs holding at least one such keypoint; the report keeps the share of pairs and keypoints.
    ``dagger``: PCK† too -- a keypoint counts only if correct *and* no other annotated keypoint of the
    predicted-in image (``images/keypoints``, every visible slot) lies strictly nearer the prediction.
    ``made``: what the predictions were made from (:func:`~spairstore.eval.provenance.method_provenance`;
    by default the version and store only)."""
    split = table_split(store, split, protocol)
    t = store.pairs(split)
    im = store.images
    # every annotated keypoint of each image, of the set scored (PCK†'s rivals)
    shown_kps = im.extra_keypoints if protocol.keypoint_set == "unseen" else im.keypoints
    forward = protocol.direction == "src->trg"
    share = None
    pred = np.asarray(pred, dtype=np.float64)
    want = (len(rows), t.kps_ids.shape[1], 2)
    if pred.shape != want:
        raise PredictionsError(f"predictions for {want[0]} pairs have shape {pred.shape}, expected {want}")
    if protocol.keypoints == "geo-aware":
        from .subsets import geo_aware_mask

        subset = geo_aware_mask(store, split, rows, protocol.direction)
        in_subset = subset.any(1)
        n_all = int(t.n_kps[rows].sum())
        share = {"pairs": float(in_subset.mean() * 100) if len(rows) else None,
                 "keypoints": float(subset.sum() / n_all * 100) if n_all else None,
                 "of_pairs": len(rows), "of_keypoints": n_all}
        rows, subset, pred = rows[in_subset], subset[in_subset], pred[in_subset]
    img = (t.trg if forward else t.src)[rows]
    query = (t.src if forward else t.trg)[rows]
    true = (t.trg_kps if forward else t.src_kps)[rows].astype(np.float64)
    M = true.shape[1]
    valid = (np.arange(M) < t.n_kps[rows, None]) & np.isfinite(true).all(-1)
    if protocol.keypoints == "geo-aware":
        valid &= subset
    size = im.size[img].astype(np.float64)
    # Per-axis factor into the frame of the measurement (x W'/W, y H'/H for a W' x H' square).
    side = float(protocol.square_side or 1)
    f = np.ones_like(size) if protocol.frame == "original" else side / size
    distance = np.where(valid, np.hypot(*((pred - true) * f[:, None, :]).transpose(2, 0, 1)), np.nan)

    if protocol.threshold in ("bbox", "query-bbox"):
        on = img if protocol.threshold == "bbox" else query
        b = im.bbox[on].astype(np.float64)
        fb = f if on is img else (np.ones_like(size) if protocol.frame == "original" else side / im.size[on])
        base = ((b[:, 2:] - b[:, :2]) * fb).max(1)
    elif protocol.threshold == "image":
        base = (size * f).max(1)
    else:
        framed = true * f[:, None, :]  # the padding point (-1, -1) lies in the measured frame
        lo = np.where(valid[..., None], framed, np.inf).min(1)
        hi = np.where(valid[..., None], framed, -np.inf).max(1)
        if protocol.threshold == "kp-extent-padded":
            lo, hi = np.minimum(lo, -1.0), np.maximum(hi, -1.0)
        base = np.where(np.isfinite(lo), hi - lo, np.nan).max(1)

    alphas = np.array(protocol.alphas)
    limit = alphas[:, None, None] * base[None, :, None]
    within = distance[None] <= limit if protocol.comparison == "<=" else distance[None] < limit
    correct = within & valid[None]
    nearest_ok = None
    if dagger:
        nearest_ok = _nearest_is_own(pred, t.kps_ids[rows], shown_kps[img].astype(np.float64), f, valid)

    labels = {k: t[k][rows].copy() for k in LEVELS if k in t}
    if not forward:
        for k in _SIDED:
            if k in labels:
                labels[k] = np.where(labels[k] >= 0, _SWAP_SIDES[labels[k].clip(0)], labels[k])
    keys = lambda i: zip(np.asarray(store.categories)[im.category[i]], im.name[i])  # noqa: E731
    return Report(
        protocol=protocol, split=split, dataset=store.dataset, store=str(store.path), method=method,
        categories=list(store.categories), rows=rows, pair_id=t.pair_id[rows], category=t.category[rows].astype(np.int64),
        labels=labels, valid=valid, distance=distance, base=base, correct=correct,
        missing=int((valid & ~np.isfinite(pred).all(-1)).sum()), groups=pair_groups(store, split, rows),
        kps_ids=t.kps_ids[rows].astype(np.int64), nearest_ok=nearest_ok, subset_share=share,
        pair_list_sha256=pair_list_sha256(split, zip(t.pair_id[rows].tolist(), keys(t.src[rows]), keys(t.trg[rows]))),
        provenance=provenance(store) if made is None else made,
    )


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f} %"


def _nearest_is_own(pred: np.ndarray, kps_ids: np.ndarray, shown: np.ndarray, f: np.ndarray,
                    valid: np.ndarray) -> np.ndarray:
    """bool (P, M): no annotated keypoint of the predicted-in image (``shown`` (P, K, 2), NaN = absent)
    other than the pair keypoint's own slot lies strictly nearer its prediction, in the measured frame."""
    j, m = np.nonzero(valid)  # only real keypoints: (n, K) instead of (P, M, K)
    d2 = (((pred[j, m][:, None, :] - shown[j]) * f[j][:, None, :]) ** 2).sum(-1)
    d2[np.isnan(d2)] = np.inf  # an absent slot is never nearer
    own = d2[np.arange(len(j)), kps_ids[j, m]]
    out = np.zeros(valid.shape, dtype=bool)
    out[j, m] = d2.min(1) >= own
    return out


def pair_groups(store: Store, split: str, rows: np.ndarray) -> dict[str, tuple[np.ndarray, list[str]]]:
    """The breakdowns a store declares beyond categories, for pair ``rows`` of ``split``: ``subset`` (the
    pair column, named by the ``subset_names`` attribute) and each grouping of ``category_groups`` (a
    pair in the group of its category). Name -> (group index per pair, -1 none; group names, sorted for
    category groupings)."""
    t = store.pairs(split)
    out: dict[str, tuple[np.ndarray, list[str]]] = {}
    for name, of_category in store.attrs.get("category_groups", {}).items():
        if len(of_category) != len(store.categories):
            raise StoreError(f"{store.path}: category_groups[{name!r}] names {len(of_category)} groups for "
                             f"{len(store.categories)} categories")
        levels = sorted(set(of_category))
        index = np.array([levels.index(g) for g in of_category], dtype=np.int64)
        out[name] = (index[t.category[rows]], levels)
    names = store.attrs.get("subset_names", [])
    if names:
        out["subset"] = (t.subset[rows].astype(np.int64), list(names))
    return out


def _grouped(groups: np.ndarray, n: int, ncorrect: np.ndarray, nvalid: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group (ids 0..n-1, -1 = left out): per-image and per-point PCK in percent ((A, n), NaN where
    empty) and pair counts (n,). ``ncorrect`` (A, P) correct keypoints per pair, ``nvalid`` (P,) keypoints."""
    keep = groups >= 0
    g, nc, nv = groups[keep], ncorrect[:, keep], nvalid[keep]
    pairs = np.bincount(g, minlength=n)
    has = nv > 0  # a pair without keypoints has no fraction correct
    scored = np.bincount(g[has], minlength=n)
    frac = nc[:, has] / nv[has]
    points = np.bincount(g, weights=nv, minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_image = np.stack([np.bincount(g[has], weights=fa, minlength=n) for fa in frac]) / scored * 100
        per_point = np.stack([np.bincount(g, weights=ca, minlength=n) for ca in nc]) / points * 100
    return per_image, per_point, pairs


def _cells(per_image: np.ndarray, per_point: np.ndarray, j: int, protocol: Protocol) -> dict[str, dict[str, float | None]]:
    """``{alpha: {aggregation: percent}}`` of group ``j``; None where the group is empty."""
    val = {"per_image": per_image, "per_point": per_point}
    return {alpha_key(a): {agg: (None if np.isnan(val[agg][i, j]) else float(val[agg][i, j]))
                           for agg in protocol.aggregation} for i, a in enumerate(protocol.alphas)}


@dataclass
class Report:
    """The result of :func:`evaluate`. Per-pair arrays follow ``rows`` (pair rows of the split).

    Attributes:
        distance: (P, M) prediction error in the protocol's frame (original pixels by default), NaN for
            padding and absent keypoints.
        base: (P,) threshold base per pair (the keypoint is correct at α when ``distance <= α * base``).
        correct: (A, P, M) bool, one layer per α of the protocol.
        labels: difficulty labels per pair as evaluated (for ``trg->src``, truncation/occlusion are those
            of the reversed pair); -1 = unknown.
        missing: keypoints whose prediction was NaN (counted wrong).
        groups: the store's further breakdowns (:func:`pair_groups`): name -> (group per pair, names).
        kps_ids: (P, M) keypoint slot id of each pair keypoint (the dataset's numbering; -1 padding).
        nearest_ok: (P, M) bool, for PCK†: no other annotated keypoint of the predicted-in image nearer
            the prediction than its own (None unless asked for).
        subset_share: with a keypoint subset, the percent of ``of_pairs`` pairs and ``of_keypoints``
            keypoints selected before it that hold / are in it (None without).
        pair_list_sha256: SHA-256 of the pairs evaluated, in order
            (:func:`~spairstore.core.records.pair_list_sha256`); with every pair of the split evaluated it
            equals the store's ``pair_list_sha256`` attribute of the split.
    """

    protocol: Protocol
    split: str
    dataset: str
    store: str
    method: str | None
    categories: list[str]
    rows: np.ndarray
    pair_id: np.ndarray
    category: np.ndarray
    labels: dict[str, np.ndarray]
    valid: np.ndarray
    distance: np.ndarray
    base: np.ndarray
    correct: np.ndarray
    missing: int = 0
    groups: dict[str, tuple[np.ndarray, list[str]]] = field(default_factory=dict)
    kps_ids: np.ndarray | None = None
    nearest_ok: np.ndarray | None = None
    subset_share: dict[str, Any] | None = None
    pair_list_sha256: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)
    _results: dict[str, Any] = field(default_factory=dict, repr=False)

    # -- numbers -------------------------------------------------------------------------------------
    @property
    def pairs(self) -> int:
        return len(self.rows)

    def per_pair(self) -> np.ndarray:
        """(A, P) fraction of each pair's keypoints correct at each α (NaN for a pair without keypoints)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.correct.sum(-1) / self.valid.sum(-1)

    def pck(self, alpha: float | None = None, aggregation: str | None = None) -> float:
        """One PCK in percent (default: the protocol's first α and first aggregation)."""
        a = alpha_key(self.protocol.alphas[0] if alpha is None else alpha)
        return self.to_dict()["pck"][a][aggregation or self.protocol.aggregation[0]]

    def curve(self, alphas: np.ndarray) -> dict[str, np.ndarray]:
        """PCK in percent at each of ``alphas`` (e.g. for a PCK-vs-α plot), per aggregation."""
        alphas = np.asarray(alphas, dtype=np.float64)
        limit = alphas[:, None, None] * self.base[None, :, None]
        ok = (self.distance[None] <= limit) if self.protocol.comparison == "<=" else (self.distance[None] < limit)
        nc, nv = ok.sum(-1), self.valid.sum(-1)
        per_image, per_point, _ = _grouped(np.zeros(self.pairs, dtype=np.int64), 1, nc, nv)
        return {"per_image": per_image[:, 0], "per_point": per_point[:, 0]}

    def to_dict(self) -> dict[str, Any]:
        """The JSON contract: ``protocol``, ``pairs``, ``pck``, ``by_category``, ``by_group`` (per
        grouping of :attr:`groups`), ``by_factor``, ``controlled`` (values in percent, None where no
        pair), plus ``category_mean`` (unweighted mean over categories), ``counts`` (pairs per group),
        ``keypoints``, ``missing_predictions``, ``pair_list_sha256``."""
        if self._results:
            return self._results
        p = self.protocol
        nc, nv = self.correct.sum(-1), self.valid.sum(-1)
        out: dict[str, Any] = {
            "protocol": p.to_dict(), "protocol_line": str(p), "dataset": self.dataset, "store": self.store,
            "split": self.split, "method": self.method, "pairs": self.pairs, "keypoints": int(nv.sum()),
            "missing_predictions": self.missing, "pair_list_sha256": self.pair_list_sha256,
            "provenance": self.provenance,
        }
        pi, pp, _ = _grouped(np.zeros(self.pairs, dtype=np.int64), 1, nc, nv)
        out["pck"] = _cells(pi, pp, 0, p)
        pi, pp, n = _grouped(self.category, len(self.categories), nc, nv)
        out["by_category"] = {c: _cells(pi, pp, j, p) for j, c in enumerate(self.categories)}
        with np.errstate(invalid="ignore"):
            mean_i, mean_p = (np.nanmean(v[:, n > 0], axis=1, keepdims=True) if (n > 0).any()
                              else np.full((len(p.alphas), 1), np.nan) for v in (pi, pp))
        out["category_mean"] = _cells(mean_i, mean_p, 0, p)
        counts: dict[str, Any] = {"by_category": {c: int(n[j]) for j, c in enumerate(self.categories)},
                                  "by_group": {}, "by_factor": {}, "controlled": {}}
        out["by_group"] = {}
        for g, (ids, levels) in self.groups.items():
            pi, pp, n = _grouped(ids, len(levels), nc, nv)
            out["by_group"][g] = {lv: _cells(pi, pp, j, p) for j, lv in enumerate(levels)}
            counts["by_group"][g] = {lv: int(n[j]) for j, lv in enumerate(levels)}
        # Factors with no known label (e.g. PF datasets) are left out rather than shown empty.
        known = {k: v for k, v in self.labels.items() if (v >= 0).any()}
        out["by_factor"], out["controlled"] = {}, {}
        for k, lab in known.items():
            levels = LEVELS[k]
            pi, pp, n = _grouped(lab.astype(np.int64), len(levels), nc, nv)
            out["by_factor"][k] = {lv: _cells(pi, pp, j, p) for j, lv in enumerate(levels)}
            counts["by_factor"][k] = {lv: int(n[j]) for j, lv in enumerate(levels)}
            others_easy = np.logical_and.reduce([known[o] == 0 for o in known if o != k] or [np.ones(self.pairs, bool)])
            pi, pp, n = _grouped(np.where(others_easy, lab, -1).astype(np.int64), len(levels), nc, nv)
            out["controlled"][k] = {lv: _cells(pi, pp, j, p) for j, lv in enumerate(levels)}
            counts["controlled"][k] = {lv: int(n[j]) for j, lv in enumerate(levels)}
        out["counts"] = counts
        if self.subset_share is not None:
            out["keypoint_subset"] = {"name": p.keypoints, **self.subset_share}
        if self.nearest_ok is not None:
            dc = (self.correct & self.nearest_ok[None]).sum(-1)
            pi, pp, _ = _grouped(np.zeros(self.pairs, dtype=np.int64), 1, dc, nv)
            out["pck_dagger"] = _cells(pi, pp, 0, p)
            pi, pp, _ = _grouped(self.category, len(self.categories), dc, nv)
            out["by_category_dagger"] = {c: _cells(pi, pp, j, p) for j, c in enumerate(self.categories)}
        self._results = out
        return out

    def per_keypoint(self) -> dict[str, Any]:
        """PCK per category and keypoint slot id (the dataset's numbering): ``{"pck": {category: {slot:
        {alpha: {aggregation: percent}}}}, "counts": {category: {slot: keypoints}}}``; per image and per
        point coincide for one keypoint, so both carry the pooled fraction. Slots never evaluated are left out."""
        if self.kps_ids is None:
            raise ValueError("this report has no keypoint ids (made by an older score())")
        C, K = len(self.categories), int(self.kps_ids.max(initial=-1)) + 1
        cell = np.where(self.valid, self.category[:, None] * K + self.kps_ids, -1).ravel()
        keep = cell >= 0
        n = np.bincount(cell[keep], minlength=C * K)
        hits = np.stack([np.bincount(cell[keep], weights=c.ravel()[keep], minlength=C * K) for c in self.correct])
        with np.errstate(invalid="ignore", divide="ignore"):
            pct = hits / n * 100
        out: dict[str, Any] = {"pck": {}, "counts": {}}
        for j, c in enumerate(self.categories):
            slots = [k for k in range(K) if n[j * K + k] > 0]
            if not slots:
                continue
            out["counts"][c] = {str(k): int(n[j * K + k]) for k in slots}
            out["pck"][c] = {str(k): {alpha_key(a): {agg: float(pct[i, j * K + k]) for agg in self.protocol.aggregation}
                                      for i, a in enumerate(self.protocol.alphas)} for k in slots}
        return out

    def per_keypoint_table(self, alpha: float | None = None) -> str:
        """Text table of :meth:`per_keypoint` at one α (default the first): a row per category, a column per slot."""
        a = alpha_key(self.protocol.alphas[0] if alpha is None else alpha)
        d = self.per_keypoint()
        K = int(self.kps_ids.max(initial=-1)) + 1 if self.kps_ids is not None else 0
        slots = [k for k in range(K) if any(str(k) in v for v in d["counts"].values())]
        agg = self.protocol.aggregation[0]
        rows = [(c, [d["pck"][c][str(k)][a][agg] if str(k) in d["pck"][c] else None for k in slots]) for c in d["pck"]]
        return text_table(f"PCK@{a} (%) per keypoint slot (rows: categories; blank: slot not evaluated)",
                          [("", str(k)) for k in slots], rows)

    # -- renderings ----------------------------------------------------------------------------------
    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def _tables(self) -> list[tuple[str, list[tuple[str, str]], list[tuple[str, list[float | None]]]]]:
        """(title, columns as (group, name), rows as (label, values)) of every table of the report."""
        d, p = self.to_dict(), self.protocol
        keys = [(alpha_key(a), agg) for agg in p.aggregation for a in p.alphas]
        label = lambda a, agg: f"PCK@{a} {agg.replace('_', ' ')}"  # noqa: E731
        tables = []
        cats = [c for c in self.categories if d["counts"]["by_category"][c] > 0]
        cols = [("", c) for c in cats] + [("", "all"), ("", "mean")]
        rows = [("pairs", [d["counts"]["by_category"][c] for c in cats] + [d["pairs"], None])]
        rows += [(label(a, agg), [d["by_category"][c][a][agg] for c in cats] + [d["pck"][a][agg], d["category_mean"][a][agg]])
                 for a, agg in keys]
        if "pck_dagger" in d:
            rows += [(label(a, agg).replace("PCK", "PCK†"), [d["by_category_dagger"][c][a][agg] for c in cats]
                      + [d["pck_dagger"][a][agg], None]) for a, agg in keys]
        tables.append(("PCK (%) per category (mean = unweighted mean over categories)", cols, rows))
        for g, levels in d["by_group"].items():
            shown = [lv for lv in levels if d["counts"]["by_group"][g][lv] > 0]
            rows = [("pairs", [d["counts"]["by_group"][g][lv] for lv in shown] + [d["pairs"]])]
            rows += [(label(a, agg), [levels[lv][a][agg] for lv in shown] + [d["pck"][a][agg]]) for a, agg in keys]
            tables.append((f"PCK (%) by {g}", [("", lv) for lv in shown] + [("", "all")], rows))
        controlled = "Controlled analysis: PCK (%) by one factor, the others easy / none"
        for section, title, with_all in (("by_factor", "PCK (%) by variation factor", True),
                                         ("controlled", controlled, False)):
            fs = d[section]
            if not fs:
                continue
            cols = [(k, lv) for k in fs for lv in fs[k]] + ([("", "all")] if with_all else [])
            rows = [("pairs", [d["counts"][section][k][lv] for k in fs for lv in fs[k]] + ([d["pairs"]] if with_all else []))]
            rows += [(label(a, agg), [fs[k][lv][a][agg] for k in fs for lv in fs[k]] + ([d["pck"][a][agg]] if with_all else []))
                     for a, agg in keys]
            tables.append((title, cols, rows))
        return tables

    def _header(self) -> str:
        method = f", method {self.method}" if self.method else ""
        miss = f", {self.missing:,} keypoints without a prediction (counted wrong)" if self.missing else ""
        sub = ""
        if self.subset_share is not None:
            sh = self.subset_share
            sub = (f"\n{self.protocol.keypoints} subset: {self.pairs:,} of {sh['of_pairs']:,} pairs "
                   f"({_pct(sh['pairs'])}), {int(self.valid.sum()):,} of {sh['of_keypoints']:,} keypoints ({_pct(sh['keypoints'])})")
        dagger = ("\nPCK†: correct and no other annotated keypoint of the predicted-in image nearer the prediction"
                  if self.nearest_ok is not None else "")
        p, made = self.provenance, ""
        if p:
            made = describe(p) + f"\nspairstore {p['spairstore']}, store fingerprint {p['store_fingerprint']}"
        if "predictions" in p:
            q = p["predictions"]
            made += f"\npredictions made by {q.get('method')} (spairstore {q.get('spairstore')}){describe(q, '  ')}"
        return (f"{self.dataset} {self.split}: {self.pairs:,} pairs, {int(self.valid.sum()):,} keypoints{method}{miss}\n"
                f"{self.protocol}{sub}{dagger}\npair list sha256 {self.pair_list_sha256}{made}")

    def to_text(self) -> str:
        """Terminal tables, laid out like the dataset paper (category names abbreviated)."""
        return "\n\n".join([self._header()] + [text_table(*t) for t in self._tables()])

    def to_markdown(self) -> str:
        header = "  \n".join(f"`{line}`" for line in self._header().split("\n"))
        return "\n\n".join([header] + [markdown_table(*t) for t in self._tables()])

    def to_csv(self) -> str:
        """Long format: ``section,group,level,alpha,aggregation,pck,pairs`` (pck in percent)."""
        d = self.to_dict()
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["section", "group", "level", "alpha", "aggregation", "pck", "pairs"])

        def put(section: str, group: str, level: str, cells: dict, pairs: int | str) -> None:
            for a, aggs in cells.items():
                for agg, v in aggs.items():
                    w.writerow([section, group, level, a, agg, "" if v is None else repr(v), pairs])

        put("all", "", "all", d["pck"], d["pairs"])
        if "pck_dagger" in d:
            put("all_dagger", "", "all", d["pck_dagger"], d["pairs"])
        put("category_mean", "", "mean", d["category_mean"], "")
        for c, cells in d["by_category"].items():
            put("category", "category", c, cells, d["counts"]["by_category"][c])
        for g, levels in d["by_group"].items():
            for lv, cells in levels.items():
                put("group", g, lv, cells, d["counts"]["by_group"][g][lv])
        for section in ("by_factor", "controlled"):
            for k, levels in d[section].items():
                for lv, cells in levels.items():
                    put(section.replace("by_", ""), k, lv, cells, d["counts"][section][k][lv])
        return buf.getvalue()

    def render(self, fmt: str = "text") -> str:
        """``text``, ``markdown``, ``csv`` or ``json``."""
        renderers = {"text": self.to_text, "markdown": self.to_markdown, "csv": self.to_csv, "json": self.to_json}
        if fmt not in renderers:
            raise ValueError(f"unknown format {fmt!r} (one of {', '.join(renderers)})")
        return renderers[fmt]()

    def __str__(self) -> str:
        return self.to_text()

    def __repr__(self) -> str:
        """One line; ``print`` shows the tables, and so does a notebook (``_repr_markdown_``)."""
        a = alpha_key(self.protocol.alphas[0])
        pck = ", ".join(f"{agg.replace('_', ' ')} {cell(v)}" for agg, v in self.to_dict()["pck"][a].items())
        method = f", {self.method}" if self.method else ""
        return (f"<Report {self.dataset} {self.split}{method}, protocol {self.protocol.name}: {self.pairs:,} pairs, "
                f"PCK@{a} {pck}>")

    def _repr_markdown_(self) -> str:
        return self.to_markdown()
