"""What a number was computed from, as reports, comparisons and saved predictions record it."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..core.version import __version__
from ..store.reader import Store

#: what of a feature set's attributes says which maps were scored (see ``info`` for the rest)
_SET_PROVENANCE = ("backbone", "library", "layers", "weights_sha256", "input_size", "stride", "flip_of")


def untrained(a: dict[str, Any]) -> str:
    """", untrained: random (seed 0) weights" for a set a backbone made without trained weights
    (``--weights random``, for pipeline tests), so no one reports its numbers as the backbone's; else ""."""
    w = a.get("weights")
    return f", untrained: {w} weights" if isinstance(w, str) and w.startswith("random") else ""


def set_line(a: dict[str, Any]) -> str:
    """A feature set's provenance in one line (report headers)."""
    layers = f" {','.join(map(str, a['layers']))}" if a.get("layers") else ""
    sha = f", weights sha256 {a['weights_sha256'][:12]}" if a.get("weights_sha256") else ""
    return f"{a.get('backbone')}{layers} at {a.get('input_size')} px, stride {a.get('stride')}{sha}{untrained(a)}"


def provenance(store: Store, feature_sets: Sequence[str] = ()) -> dict[str, Any]:
    """What a number was computed from: the spairstore version, the store's fingerprint (its images at
    its size) and, per feature set read, the backbone, weights' SHA-256 (or that they were random) and
    geometry."""
    def of(a: dict[str, Any]) -> dict[str, Any]:
        keys = (*_SET_PROVENANCE, "weights") if untrained(a) else _SET_PROVENANCE
        return {k: a[k] for k in keys if a.get(k) is not None}

    sets = {n: of(store.feature_sets[n]) for n in dict.fromkeys(feature_sets) if n in store.feature_sets}
    return {"spairstore": __version__, "store_fingerprint": store.fingerprint, "feature_sets": sets}


def method_provenance(store: Store, method: Any) -> dict[str, Any]:
    """:func:`provenance` of a method: the feature sets it reads (its ``feature_sets``) and what else it
    declares (``made_with``, e.g. a head file's SHA-256); a non-method (predictions) reads none."""
    if not callable(method):
        return provenance(store)
    return {**provenance(store, getattr(method, "feature_sets", ())), **getattr(method, "made_with", {})}


def describe(made: dict[str, Any], who: str = "") -> str:
    """The feature sets and head of a :func:`method_provenance`, one header line each (each line begins
    with a newline and ``who``)."""
    out = "".join(f"\n{who}feature set {n}: {set_line(a)}" for n, a in made.get("feature_sets", {}).items())
    if "head_sha256" in made:
        out += f"\n{who}head {made.get('head')}: sha256 {made['head_sha256'][:12]}"
    return out
