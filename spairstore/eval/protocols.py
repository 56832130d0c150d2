"""PCK protocols: every convention the number depends on, as one frozen, printable record.

Published PCK numbers disagree because each codebase silently picks a direction, a threshold base, a
comparison, an aggregation, a coordinate frame and a pair subset. A :class:`Protocol` names all of them;
every report prints its protocol line. Built-in protocols (:data:`PROTOCOLS`):

========================  ============================================================================
``spair``                 src->trg; α · max(w, h) of the target bbox; original pixels; ``<=``;
                          α 0.1 / 0.05 / 0.01 (the SPair-71k devkit)
``pfpascal``              α · max(W, H) of the target image; α 0.05 / 0.1 / 0.15
``pfwillow``              α · max side of the extent of the target's real keypoints (tight)
``pfwillow-legacy``       the same extent with the padding point (-1, -1) inside min/max, in original
                          pixels (an approximation: neither lineage measured in original pixels)
``pfwillow-cats``         the CATs code exactly: trg->src, every image squashed to 256 x 256, the
                          source keypoints' extent with the padding point (-1, -1) of that frame, ``<=``
``pfwillow-dhpf``         the DHPF code exactly: src->trg, squashed to 240 x 240, the target keypoints'
                          extent with the padding point (-1, -1) of that frame, ``<=``
``ap10k``                 α · max(w, h) of the target bbox, ``<`` (strict), α 0.1 / 0.05 / 0.01: the
                          AP-10K benchmark as GeoAware-SC evaluates it (``utils/utils_dataset.py``
                          thresholds on the target's COCO box, ``pck_train.py`` counts ``dist < α·thr``)
``geoaware``              GeoAware-SC on SPair-71k: α · max(w, h) of the target bbox, ``<``, per image
                          (per point with ``aggregation``), every pair (its eval configs)
``geoaware-sampled``      the same on its ``TEST_SAMPLE`` draw: 20 pairs per category with replacement,
                          ``np.random.seed(42)`` before each category's sorted pair files
========================  ============================================================================

Custom protocols compose the same fields: ``Protocol(name="mine", threshold="image", ...)`` or
``get_protocol("spair").replace(direction="trg->src")``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..core.errors import SpairstoreError

DIRECTIONS = ("src->trg", "trg->src")
#: Threshold bases, each measured on the image the predictions lie in (the target for src->trg).
THRESHOLDS = {
    "bbox": "max(w, h) of the {img} bbox",
    "image": "max(W, H) of the {img} image",
    "kp-extent": "max side of the extent of the {img}'s real keypoints",
    "kp-extent-padded": "max side of the extent of the {img}'s keypoints and the padding point (-1, -1)",
    "query-bbox": "max(w, h) of the {query} bbox",
}
COMPARISONS = ("<=", "<")
AGGREGATIONS = ("per_image", "per_point")
#: ``original``: original pixels of the predicted-in image. ``square``: that image squashed to a square
#: (x / W, y / H), where the tolerance region is an ellipse in original pixels — some published code does this.
FRAMES = ("original", "square")
#: How ``subsample`` draws pairs. ``rng``: ``numpy.random.default_rng(seed)``, without replacement,
#: categories in index order, pairs in table order. ``geoaware-sc``: GeoAware-SC's ``load_spair_data``
#: exactly: per category ``np.random.seed(seed)`` then ``np.random.choice(n, subsample)`` (legacy
#: RandomState, *with* replacement) over that category's pair files sorted by file name.
SAMPLINGS = ("rng", "geoaware-sc")
#: Keypoints scored. ``geo-aware``: GeoAware-SC's geometry-aware subset (:mod:`spairstore.eval.subsets`).
KEYPOINTS = ("all", "geo-aware")
#: Keypoint annotations scored. ``unseen``: SPair-U's new keypoints on the same pairs (the store's split
#: ``<split>-unseen`` and ``images/extra_keypoints``), for a model trained on the ``annotated`` ones.
KEYPOINT_SETS = ("annotated", "unseen")


class ProtocolError(SpairstoreError):
    """An unknown protocol name or an invalid protocol field."""


@dataclass(frozen=True)
class Protocol:
    """How PCK is computed. A keypoint is correct at α when ``distance <= α · base`` (or ``<``).

    Attributes:
        name: short name printed in reports.
        direction: ``src->trg`` (predict target keypoints from source ones; threshold on the target) or
            ``trg->src`` (predict source keypoints; threshold on the source). In ``trg->src`` every pair is
            evaluated as its reverse, so the truncation/occlusion levels ``src``/``trg`` are swapped with it:
            ``trg`` always names the image the predictions lie in.
        threshold: base of the threshold, one of :data:`THRESHOLDS`.
        alphas: α values, reported in this order.
        comparison: ``<=`` (the devkit) or ``<``.
        aggregation: ``per_image`` (mean over pairs of each pair's fraction correct) and/or ``per_point``
            (all keypoints pooled); the first is the headline number.
        frame: coordinate frame distances and the base are measured in, one of :data:`FRAMES`.
        square_side: side in pixels of the ``square`` frame. It matters only to ``kp-extent-padded``,
            whose padding point (-1, -1) lies in that frame; None: the unit square.
        subsample: evaluate only this many pairs per category (drawn with ``seed``); None = every pair.
        seed: random seed of the sub-sampling.
        sampling: how ``subsample`` draws, one of :data:`SAMPLINGS`.
        keypoints: which pair keypoints are scored, one of :data:`KEYPOINTS`.
        keypoint_set: which annotation's keypoints, one of :data:`KEYPOINT_SETS`.
    """

    name: str
    direction: str = "src->trg"
    threshold: str = "bbox"
    alphas: tuple[float, ...] = (0.1, 0.05, 0.01)
    comparison: str = "<="
    aggregation: tuple[str, ...] = AGGREGATIONS
    frame: str = "original"
    subsample: int | None = None
    seed: int = 0
    square_side: int | None = None
    sampling: str = "rng"
    keypoints: str = "all"
    keypoint_set: str = "annotated"

    def __post_init__(self) -> None:
        # Coerce lists (from JSON or the CLI) so the record stays hashable and comparable.
        object.__setattr__(self, "alphas", tuple(float(a) for a in self.alphas))
        object.__setattr__(self, "aggregation", tuple(self.aggregation))
        for field, value, allowed in (("direction", self.direction, DIRECTIONS),
                                      ("threshold", self.threshold, tuple(THRESHOLDS)),
                                      ("comparison", self.comparison, COMPARISONS),
                                      ("frame", self.frame, FRAMES),
                                      ("sampling", self.sampling, SAMPLINGS),
                                      ("keypoints", self.keypoints, KEYPOINTS),
                                      ("keypoint_set", self.keypoint_set, KEYPOINT_SETS)):
            if value not in allowed:
                raise ProtocolError(f"protocol {self.name!r}: {field} {value!r} is not one of {', '.join(allowed)}")
        if not self.alphas or any(not 0 < a < 10 for a in self.alphas):
            raise ProtocolError(f"protocol {self.name!r}: alphas must be a non-empty list of positive numbers, "
                                f"got {list(self.alphas)}")
        if len(set(self.alphas)) != len(self.alphas):
            raise ProtocolError(f"protocol {self.name!r}: repeated alpha in {list(self.alphas)}")
        if not self.aggregation or any(a not in AGGREGATIONS for a in self.aggregation):
            raise ProtocolError(f"protocol {self.name!r}: aggregation must be some of {', '.join(AGGREGATIONS)}, "
                                f"got {list(self.aggregation)}")
        if self.subsample is not None and self.subsample < 1:
            raise ProtocolError(f"protocol {self.name!r}: subsample must be a positive number of pairs per category")
        if self.square_side is not None and (self.frame != "square" or self.square_side < 1):
            raise ProtocolError(f"protocol {self.name!r}: square_side needs frame 'square' and a positive side")
        if self.keypoint_set == "unseen" and self.keypoints == "geo-aware":
            raise ProtocolError(f"protocol {self.name!r}: the geo-aware groups name annotated keypoint slots, "
                                "not SPair-U's unseen ones")

    @property
    def predicted_image(self) -> str:
        """``trg`` or ``src``: the pair image the predictions lie in (and the threshold is measured on)."""
        return "trg" if self.direction == "src->trg" else "src"

    def replace(self, **changes: Any) -> Protocol:
        """A copy with ``changes``; unless a new ``name`` is given it is named after this one and the
        changed fields, e.g. ``spair[comparison=<]``."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ProtocolError(f"protocol has no field(s) {', '.join(sorted(unknown))}")
        new = dataclasses.replace(self, **changes)
        diff = [f.name for f in dataclasses.fields(self) if f.name != "name" and getattr(new, f.name) != getattr(self, f.name)]
        if "name" not in changes and diff:
            shown = ",".join(f"{k}={_fmt(getattr(new, k))}" for k in diff)
            new = dataclasses.replace(new, name=f"{self.name}[{shown}]")
        return new

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields (lists for tuples)."""
        d = dataclasses.asdict(self)
        d["alphas"], d["aggregation"] = list(self.alphas), list(self.aggregation)
        return d

    def __str__(self) -> str:
        img, query = ("target", "source") if self.direction == "src->trg" else ("source", "target")
        if self.subsample is None:
            pairs = "all pairs"
        elif self.sampling == "rng":
            pairs = f"{self.subsample} random pairs per category (seed {self.seed})"
        else:
            pairs = (f"{self.subsample} pairs per category drawn with replacement as GeoAware-SC does "
                     f"(np.random.seed({self.seed}) per category, pair files sorted)")
        frame = ("original pixels" if self.frame == "original" else
                 f"images squashed to {self.square_side} x {self.square_side}" if self.square_side else "squashed-square frame")
        kps = "" if self.keypoints == "all" else f", {self.keypoints} keypoints only"
        kps += ", SPair-U's unseen keypoints" if self.keypoint_set == "unseen" else ""
        return (f"protocol {self.name}: {self.direction}, correct if distance {self.comparison} "
                f"alpha * {THRESHOLDS[self.threshold].format(img=img, query=query)}, {frame}, "
                f"alpha {'/'.join(_fmt(a) for a in self.alphas)}, "
                f"{' and '.join(a.replace('_', ' ') for a in self.aggregation)}, {pairs}{kps}")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "/".join(_fmt(v) for v in value)
    return str(value)


def alpha_key(alpha: float) -> str:
    """The JSON key of an α: ``0.1`` -> ``"0.1"``."""
    return f"{alpha:g}"


PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (
    Protocol("spair"),
    Protocol("pfpascal", threshold="image", alphas=(0.05, 0.1, 0.15)),
    Protocol("pfwillow", threshold="kp-extent", alphas=(0.05, 0.1, 0.15)),
    Protocol("pfwillow-legacy", threshold="kp-extent-padded", alphas=(0.05, 0.1, 0.15)),
    Protocol("pfwillow-cats", direction="trg->src", threshold="kp-extent-padded", alphas=(0.05, 0.1, 0.15),
             frame="square", square_side=256),
    Protocol("pfwillow-dhpf", threshold="kp-extent-padded", alphas=(0.05, 0.1, 0.15), frame="square",
             square_side=240),
    Protocol("ap10k", comparison="<"),
    Protocol("geoaware", comparison="<"),
    Protocol("geoaware-sampled", comparison="<", subsample=20, seed=42, sampling="geoaware-sc"),
)}

#: The protocol a store's ``dataset`` attribute implies.
DEFAULT_FOR_DATASET = {"spair71k": "spair", "pfpascal": "pfpascal", "pfwillow": "pfwillow", "ap10k": "ap10k"}


def get_protocol(protocol: str | Protocol | None, dataset: str | None = None) -> Protocol:
    """A protocol by name (or passed through); None picks the default of ``dataset``."""
    if isinstance(protocol, Protocol):
        return protocol
    if protocol is None:
        if dataset not in DEFAULT_FOR_DATASET:
            raise ProtocolError(f"no default protocol for dataset {dataset!r}; name one of {', '.join(PROTOCOLS)}")
        protocol = DEFAULT_FOR_DATASET[dataset]
    try:
        return PROTOCOLS[protocol]
    except KeyError:
        raise ProtocolError(f"unknown protocol {protocol!r} (known: {', '.join(PROTOCOLS)})") from None


def resolve_protocol(protocol: str | Protocol | None, dataset: str | None, **overrides: Any) -> Protocol:
    """:func:`get_protocol`, then :meth:`Protocol.replace` with the ``overrides`` that are not None
    (how the CLI composes a custom protocol). ``alphas`` may be a comma-separated string."""
    base = get_protocol(protocol, dataset)
    changes = {k: v for k, v in overrides.items() if v is not None}
    if isinstance(changes.get("alphas"), str):
        try:
            changes["alphas"] = tuple(float(a) for a in changes["alphas"].split(",") if a.strip())
        except ValueError:
            raise ProtocolError(f"alphas must be comma-separated numbers, got {overrides['alphas']!r}") from None
    if isinstance(changes.get("aggregation"), str):
        changes["aggregation"] = tuple(a.strip().replace("-", "_") for a in changes["aggregation"].split(","))
    return base.replace(**changes) if changes else base
