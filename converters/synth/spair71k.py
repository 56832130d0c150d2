"""A synthetic SPair-71k, written in the dataset's native layout and byte format.

:func:`synthesize` writes ``JPEGImages/``, ``Segmentation/``, ``ImageAnnotation/``, ``PairAnnotation/``
and ``Layout/`` exactly as the real dataset lays them out, so every tool that reads SPair-71k (our
converter included) can be exercised, benchmarked and demonstrated without the real data.

The images carry signal, so that matching on features beats the identity mapping. Each category has a
fixed 3D template: an ellipsoid body with a head, a skeleton of limbs and a category-specific set of
keypoint slots on the body's surface. Each keypoint slot is drawn as a marker of its own (fill colour,
shape, inner dot) that looks the same in every image, whatever the view. Per image, the template is seen
from one of the 8 azimuth bins (yaw, plus a little elevation and in-plane roll), at a random position
and scale, over a textured, noisy background. Some objects run off the frame (truncated: the keypoints
outside become null, the box is clipped), some are partly hidden by an occluder patch (occluded: the
keypoints under it become null), and keypoints on the far side of the body are null too.

All coordinates are original image pixels, ``(x, y)`` order: a keypoint ``[x, y]`` is the pixel at
column ``x``, row ``y`` on which its marker is centred; boxes are VOC ``[x1, y1, x2, y2]``, 1-based
inclusive, the extent of the object's visible pixels (those of the segmentation mask).

Output is a pure function of the arguments: the same seed gives the same bytes (fixed JPEG quality,
no timestamps, no dependence on the order files are written in).
"""
from __future__ import annotations

import io
import json
import math
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from converters.spair71k import CATEGORIES, NUM_KEYPOINTS, SPLITS, pair_annotation
from converters.voc import CLASS_INDEX, palette
from spairstore.core.errors import SpairstoreError

__all__ = ["SynthSummary", "synthesize", "MIN_IMAGES_PER_CATEGORY", "MAX_IMAGES_PER_CATEGORY"]

#: Fewest images per category: every split needs two images to hold a pair.
MIN_IMAGES_PER_CATEGORY = 6
#: Most images per category (the VOC-like name space must stay far from exhausted).
MAX_IMAGES_PER_CATEGORY = 1000

#: Share of a category's images in val and test (the rest is trn); 100 images give 55 / 18 / 27.
_SPLIT_SHARE = {"val": 0.18, "test": 0.27}
#: Share of a split's pairs listed in Layout/small (real: 10,652 of 53,340 trn, about 20 %).
_SMALL_SHARE = 0.2
#: The real dataset has 23 names shared by two categories among 1,800 images.
_DUPLICATE_RATE = 23 / 1800
_JPEG_QUALITY = 90
_YEARS = (2007, 2008, 2009, 2010, 2011)
_YEAR_WEIGHTS = (0.1, 0.3, 0.25, 0.25, 0.1)

#: Keypoint slots used per category: the real dataset's counts, capped at 20 so markers stay apart.
_NUM_SLOTS = {
    "aeroplane": 20, "bicycle": 12, "bird": 17, "boat": 14, "bottle": 10, "bus": 20, "car": 20,
    "cat": 15, "chair": 14, "cow": 20, "dog": 16, "horse": 20, "motorbike": 13, "person": 20,
    "pottedplant": 9, "sheep": 20, "train": 18, "tvmonitor": 16,
}
#: pose string of each azimuth bin when the pose is specified (as in the real annotations).
_POSE_OF_AZIMUTH = ("Frontal", "Left", "Left", "Rear", "Rear", "Right", "Right", "Frontal")
_P_UNSPECIFIED = 0.35
_P_TRUNCATED = 0.22
_P_OCCLUDED = 0.2
_P_DIFFICULT = 0.01
#: A keypoint faces the camera when its surface normal's depth component exceeds this; slightly
#: negative so points on the silhouette count as visible from both sides.
_FACING = -0.3
_MIN_VISIBLE = 3

# Marker look of each of the 30 keypoint slots: a (fill, shape, inner dot) triple unique to the slot,
# fixed for all categories and images, so a slot's local pattern is the same everywhere.
_PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (255, 255, 255),
)
_SHAPES = ("circle", "square", "triangle", "diamond", "hexagon")


def _marker_styles() -> tuple[tuple[tuple[int, int, int], str, tuple[int, int, int]], ...]:
    combos = [(f, s) for s in range(len(_SHAPES)) for f in range(len(_PALETTE))]
    order = np.random.default_rng(20190701).permutation(len(combos))[:NUM_KEYPOINTS]
    styles = []
    for i in order:
        f, s = combos[int(i)]
        inner = (f * 7 + s * 5 + 3) % len(_PALETTE)
        if inner == f:
            inner = (inner + 1) % len(_PALETTE)
        styles.append((_PALETTE[f], _SHAPES[s], _PALETTE[inner]))
    return tuple(styles)


_MARKERS = _marker_styles()


@dataclass(frozen=True)
class SynthSummary:
    """What :func:`synthesize` wrote."""

    out_dir: Path
    images: int  #: image files written (one JPEG, mask and annotation each)
    pairs: dict[str, int]  #: pair files written per split
    seconds: float  #: wall-clock time taken

    def __str__(self) -> str:
        pairs = ", ".join(f"{s} {n:,}" for s, n in self.pairs.items())
        return f"wrote {self.images:,} images and pairs ({pairs}) to {self.out_dir} in {self.seconds:.1f} s"


@dataclass(frozen=True)
class _Template:
    """A category's object in its own frame: x right, y up, z towards the viewer at azimuth 0."""

    slots: tuple[int, ...]  #: keypoint slot ids used by the category
    points: np.ndarray  #: (K, 3) keypoint positions on the body surface
    normals: np.ndarray  #: (K, 3) unit outward normals there
    axes: np.ndarray  #: (3,) body ellipsoid semi-axes
    head: np.ndarray  #: (3,) head centre
    head_radius: float
    edges: tuple[tuple[int, int], ...]  #: limbs between keypoints (indices into slots)
    body_rgb: np.ndarray  #: (3,) float body colour


def _stable_seed(*parts: Any) -> int:
    """A seed from strings/ints that does not depend on Python's hash randomisation."""
    return zlib.crc32("\x1f".join(map(str, parts)).encode())


@lru_cache(maxsize=None)
def _template(category: str) -> _Template:
    # Fixed per category, independent of the user's seed: a category always looks the same.
    rng = np.random.default_rng(_stable_seed("template", category))
    k = _NUM_SLOTS[category]
    axes = rng.uniform(0.45, 1.0, 3)
    axes /= axes.max()
    # Fibonacci sphere: evenly spread directions, so the markers stay apart; then a random rotation
    # and a little jitter so categories differ.
    i = np.arange(k) + 0.5
    phi = np.arccos(1 - 2 * i / k)
    theta = math.pi * (1 + 5**0.5) * i
    dirs = np.stack([np.cos(theta) * np.sin(phi), np.cos(phi), np.sin(theta) * np.sin(phi)], 1)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    dirs = dirs @ q.T + rng.normal(scale=0.08, size=(k, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    points = dirs * axes
    normals = dirs / axes
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    # Limbs: the minimum spanning tree over the keypoints (Prim's algorithm; K <= 20).
    d = np.linalg.norm(points[:, None] - points[None], axis=2)
    inside, edges = {0}, []
    while len(inside) < k:
        best = min(((d[a, b], a, b) for a in inside for b in range(k) if b not in inside))
        edges.append((best[1], best[2]))
        inside.add(best[2])
    head = np.array([0.0, 0.45 * axes[1], 0.9 * axes[2]])
    hue = rng.uniform(0, 1)
    body = np.array(_hsv_to_rgb(hue, rng.uniform(0.25, 0.5), rng.uniform(0.4, 0.7))) * 255
    return _Template(
        slots=tuple(range(k)), points=points, normals=normals, axes=axes, head=head,
        head_radius=0.35 * float(axes.min()) + 0.1, edges=tuple(edges), body_rgb=body,
    )


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[float, float, float]:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]


def _rotation(yaw: float, elevation: float) -> np.ndarray:
    cy, sy = math.cos(yaw), math.sin(yaw)
    ce, se = math.cos(elevation), math.sin(elevation)
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, ce, -se], [0, se, ce]])
    return rx @ ry


def _background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Smooth random colour field plus muted distractor shapes (no keypoint-like markers)."""
    gh, gw = rng.integers(3, 8, 2)
    # Half-desaturated, so the saturated keypoint markers stay the most distinctive colours around.
    field = rng.integers(30, 226, (gh, gw, 3))
    field = ((field + field.mean(axis=2, keepdims=True)) / 2).astype(np.uint8)
    img = Image.fromarray(field, "RGB").resize((w, h), Image.BILINEAR)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(5, 13))):
        grey = rng.integers(40, 200)
        colour = tuple(int(c) for c in np.clip(grey + rng.integers(-30, 31, 3), 0, 255))
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        sx, sy = rng.uniform(15, 110, 2)
        kind = rng.integers(3)
        if kind == 0:
            draw.ellipse([x - sx, y - sy, x + sx, y + sy], fill=colour)
        elif kind == 1:
            draw.rectangle([x - sx, y - sy, x + sx, y + sy], fill=colour)
        else:
            draw.line([x - sx, y - sy, x + sx, y + sy], fill=colour, width=int(rng.integers(2, 9)))
    return img


def _marker_polygon(shape: str, x: float, y: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "triangle":
        return [(x, y - r), (x + 0.95 * r, y + 0.75 * r), (x - 0.95 * r, y + 0.75 * r)]
    if shape == "diamond":
        return [(x, y - 1.15 * r), (x + r, y), (x, y + 1.15 * r), (x - r, y)]
    if shape == "hexagon":
        return [(x + r * math.cos(a), y + r * math.sin(a)) for a in np.arange(6) * math.pi / 3]
    return None


def _draw_marker(draws: Sequence[ImageDraw.ImageDraw], fills: Sequence[Any], slot: int,
                 x: float, y: float, r: float) -> None:
    """Slot ``slot``'s marker centred on (x, y): shape outlined in black, inner dot on top.

    ``draws[0]`` is the RGB image (drawn in the marker's colours); the others are label images, filled
    with the matching entry of ``fills``.
    """
    colour, shape, inner = _MARKERS[slot]
    box = [x - r, y - r, x + r, y + r]
    poly = _marker_polygon(shape, x, y, r)
    outline_w = max(1, int(round(r / 6)))
    for i, draw in enumerate(draws):
        fill = colour if i == 0 else fills[i - 1]
        line = (0, 0, 0) if i == 0 else fills[i - 1]
        if shape == "circle":
            draw.ellipse(box, fill=fill, outline=line, width=outline_w)
        elif shape == "square":
            s = 0.85 * r
            draw.rectangle([x - s, y - s, x + s, y + s], fill=fill, outline=line, width=outline_w)
        else:
            draw.polygon(poly, fill=fill, outline=line, width=outline_w)
    ri = 0.38 * r
    draws[0].ellipse([x - ri, y - ri, x + ri, y + ri], fill=inner)


def _render(category: str, name: str, year: int, seed: int) -> tuple[bytes, bytes, dict[str, Any]]:
    """Draw one image; returns (JPEG bytes, mask PNG bytes, ImageAnnotation dict)."""
    tpl = _template(category)
    rng = np.random.default_rng(_stable_seed("image", seed, category, name))
    if rng.random() < 0.7:  # landscape, like most VOC photos
        w, h = 500, int(rng.integers(280, 401))
    else:
        w, h = int(rng.integers(300, 401)), 500
    azimuth = int(rng.integers(8))
    # Bins are 45 degrees wide and centred on multiples of 45 (bin 0 = frontal).
    yaw = math.radians(azimuth * 45 + rng.uniform(-18, 18))
    rot = _rotation(yaw, math.radians(rng.uniform(-10, 25)))
    roll = math.radians(rng.uniform(-12, 12))
    cr, sr = math.cos(roll), math.sin(roll)
    inplane = np.array([[cr, -sr], [sr, cr]])

    pts = tpl.points @ rot.T
    normals = tpl.normals @ rot.T
    facing = normals[:, 2] > _FACING
    head = tpl.head @ rot.T
    # Silhouette of the rotated ellipsoid under orthographic projection: an ellipse whose 2x2 shape
    # matrix is the top-left block of R diag(a^2) R^T.
    shape2 = (rot @ np.diag(tpl.axes**2) @ rot.T)[:2, :2]
    t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
    sil = np.stack([np.cos(t), np.sin(t)], 1) @ np.linalg.cholesky(shape2).T
    # To image axes (y down) after the in-plane roll; unit scale, origin at the body centre.
    def to_img(xy: np.ndarray) -> np.ndarray:
        return (xy @ inplane.T) * np.array([1.0, -1.0])

    sil_u, pts_u, head_u = to_img(sil), to_img(pts[:, :2]), to_img(head[None, :2])[0]
    hr = tpl.head_radius
    lo = np.minimum(sil_u.min(0), head_u - hr)
    hi = np.maximum(sil_u.max(0), head_u + hr)
    extent = hi - lo

    body_rgb = np.clip(tpl.body_rgb + rng.integers(-18, 19, 3), 0, 255)
    body = tuple(int(c) for c in body_rgb)
    limb = tuple(int(c) for c in body_rgb * 0.55)
    head_col = tuple(int(c) for c in np.clip(body_rgb * 1.2 + 10, 0, 255))
    background = _background(rng, w, h)
    cls = CLASS_INDEX[category]
    difficult = int(rng.random() < _P_DIFFICULT)
    pose = "Unspecified" if rng.random() < _P_UNSPECIFIED else _POSE_OF_AZIMUTH[azimuth]

    for attempt in range(20):
        # Placement and occlusion are redrawn until enough keypoints show; the later attempts drop
        # truncation and occlusion so the loop always ends.
        hard_ok = attempt < 10
        # Log-uniform object size: box area ratios reach past 4 (the "hard" scale label).
        size = math.exp(rng.uniform(math.log(0.28), math.log(0.85))) * min(w, h)
        scale = size / extent.max()
        r = max(4.0, 0.06 * size)  # marker radius
        # The object's pixel extent relative to its centre, markers (which may poke out) included.
        o_lo, o_ext = lo * scale - r, extent * scale + 2 * r
        centre = np.empty(2)
        for ax, lim in enumerate((w, h)):
            # Fully inside (2 px margin) unless truncating along this axis.
            room = lim - 5 - o_ext[ax]
            centre[ax] = 2 - o_lo[ax] + (rng.uniform(0, room) if room > 0 else room / 2)
        if hard_ok and rng.random() < _P_TRUNCATED:
            ax = int(rng.integers(2))
            out = rng.uniform(0.15, 0.45) * o_ext[ax]
            lim = (w, h)[ax]
            centre[ax] = -o_lo[ax] - out if rng.random() < 0.5 else lim - 1 - o_lo[ax] - o_ext[ax] + out
        occlude = hard_ok and rng.random() < _P_OCCLUDED

        img = background.copy()
        mask = Image.new("L", (w, h), 0)
        ids = Image.new("L", (w, h), 0)  # which slot's marker owns each pixel (slot + 1), 0 none
        draw, mdraw, idraw = ImageDraw.Draw(img), ImageDraw.Draw(mask), ImageDraw.Draw(ids)
        sil_px = [tuple(p) for p in sil_u * scale + centre]
        hc, hrad = head_u * scale + centre, hr * scale
        head_box = [hc[0] - hrad, hc[1] - hrad, hc[0] + hrad, hc[1] + hrad]
        # Painter's order: the head is behind the body when it points away from the camera.
        parts = [("body", sil_px), ("head", head_box)] if head[2] >= 0 else [("head", head_box), ("body", sil_px)]
        for kind, geom in parts:
            if kind == "body":
                draw.polygon(geom, fill=body, outline=limb, width=2)
                mdraw.polygon(geom, fill=cls)
            else:
                draw.ellipse(geom, fill=head_col, outline=limb, width=2)
                mdraw.ellipse(geom, fill=cls)
        kp = pts_u * scale + centre
        lw = max(2, int(round(0.05 * size)))
        for a, b in tpl.edges:
            if facing[a] and facing[b]:
                seg = [tuple(kp[a]), tuple(kp[b])]
                draw.line(seg, fill=limb, width=lw)
                mdraw.line(seg, fill=cls, width=lw)
        rounded = np.rint(kp).astype(int)
        for i in np.argsort(pts[:, 2], kind="stable"):  # far to near: near markers win overlaps
            if facing[i]:
                x, y = rounded[i]
                _draw_marker((draw, mdraw, idraw), (cls, int(tpl.slots[i]) + 1), tpl.slots[i], x, y, r)

        # Truncated: the drawn object (before any occluder covers it) reaches the frame's edge.
        ox0, oy0, ox1, oy1 = mask.getbbox()
        truncated = int(ox0 == 0 or oy0 == 0 or ox1 == w or oy1 == h)
        inframe = (rounded[:, 0] >= 1) & (rounded[:, 0] <= w - 2) & (rounded[:, 1] >= 1) & (rounded[:, 1] <= h - 2)
        candidates = np.flatnonzero(facing & inframe)
        slot_of = np.asarray(tpl.slots)[candidates] + 1
        rows, cols = rounded[candidates, 1], rounded[candidates, 0]
        shown = np.asarray(ids)[rows, cols] == slot_of  # not hidden by a nearer marker
        if occlude and len(candidates) > _MIN_VISIBLE:
            ax_, ay_ = kp[candidates[rng.integers(len(candidates))]]
            hw, hh = rng.uniform(0.12, 0.28, 2) * size
            ox, oy = ax_ + rng.uniform(-0.35, 0.35) * hw, ay_ + rng.uniform(-0.35, 0.35) * hh
            box = [ox - hw, oy - hh, ox + hw, oy + hh]
            grey = int(rng.integers(60, 200))
            occ_col = tuple(int(c) for c in np.clip(grey + rng.integers(-25, 26, 3), 0, 255))
            stripe = tuple(max(0, c - 45) for c in occ_col)
            shape_fn = "ellipse" if rng.random() < 0.5 else "rectangle"
            getattr(draw, shape_fn)(box, fill=occ_col)
            getattr(mdraw, shape_fn)(box, fill=0)
            getattr(idraw, shape_fn)(box, fill=0)
            if shape_fn == "rectangle":  # stripes: a texture of its own, unlike any marker
                step = max(4.0, hw / 3)
                for sx in np.arange(ox - hw + step / 2, ox + hw, step):
                    draw.line([(sx, oy - hh), (sx, oy + hh)], fill=stripe, width=2)

        visible = np.zeros(len(kp), bool)
        visible[candidates] = np.asarray(ids)[rows, cols] == slot_of
        # Occluded: the occluder hid a keypoint that showed before it was drawn.
        occluded = int(bool((shown & ~visible[candidates]).any()))
        if visible.sum() >= _MIN_VISIBLE:
            break
    else:  # pragma: no cover - attempts without truncation/occlusion always succeed in practice
        raise RuntimeError(f"synth: could not place {category}/{name}")

    # Sensor noise over everything (markers included), so no two renderings of a slot are identical.
    arr = np.asarray(img, dtype=np.int16) + rng.integers(-9, 10, (h, w, 3), dtype=np.int16)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    jpg = io.BytesIO()
    img.save(jpg, "JPEG", quality=_JPEG_QUALITY)
    mask_p = Image.frombytes("P", mask.size, mask.tobytes())
    mask_p.putpalette(palette())
    png = io.BytesIO()
    mask_p.save(png, "PNG")

    x0, y0, x1, y1 = mask.getbbox()  # exclusive right/bottom, 0-based
    kps: dict[str, list[int] | None] = {str(s): None for s in range(NUM_KEYPOINTS)}
    for i, slot in enumerate(tpl.slots):
        if visible[i]:
            kps[str(slot)] = [int(rounded[i, 0]), int(rounded[i, 1])]
    ann = {
        "filename": f"{name}.jpg",
        "src_database": f"The VOC{year} Database",
        "src_annotation": f"PASCAL VOC{year}",
        "src_image": "flickr",
        "image_width": w,
        "image_height": h,
        "image_depth": 3,
        "category": category,
        "pose": pose,
        "truncated": truncated,
        "occluded": occluded,
        "difficult": difficult,
        "bndbox": [x0 + 1, y0 + 1, x1, y1],  # VOC: 1-based, inclusive
        "kps": kps,
        "azimuth_id": azimuth,
    }
    return jpg.getvalue(), png.getvalue(), ann


def _names(categories: Sequence[str], n: int, seed: int) -> dict[str, list[tuple[str, int]]]:
    """VOC-like (name, year) per category: unique within a category; a few names shared by two
    categories, like the real dataset's 23, because image keys are (category, name)."""
    rng = np.random.default_rng(_stable_seed("names", seed))
    total = n * len(categories)
    # Draw all names without replacement from a 5-year x 8999-number space: no accidental clashes.
    per_year = 8999
    p = np.repeat(np.asarray(_YEAR_WEIGHTS) / per_year, per_year)
    picks = rng.choice(len(_YEARS) * per_year, size=total, replace=False, p=p / p.sum())
    chosen = [(_YEARS[int(i) // per_year], int(i) % per_year + 1) for i in picks]
    out = {c: [(f"{y}_{num:06d}", y) for y, num in chosen[i * n:(i + 1) * n]] for i, c in enumerate(categories)}
    if len(categories) >= 2:
        shared: set[str] = set()
        for _ in range(max(1, round(total * _DUPLICATE_RATE))):
            a, b = (categories[int(i)] for i in rng.choice(len(categories), 2, replace=False))
            free_a = [e for e in out[a] if e[0] not in shared]
            slots_b = [i for i, e in enumerate(out[b]) if e[0] not in shared]
            if not free_a or not slots_b:
                continue
            entry = free_a[int(rng.integers(len(free_a)))]
            out[b][slots_b[int(rng.integers(len(slots_b)))]] = entry
            shared.add(entry[0])
    return out


def _check_args(out_dir: Path, images_per_category: Any, categories: Sequence[str] | None,
                seed: Any) -> tuple[str, ...]:
    if isinstance(images_per_category, bool) or not isinstance(images_per_category, (int, np.integer)):
        raise SpairstoreError(f"images_per_category must be an integer, got {images_per_category!r}")
    if not MIN_IMAGES_PER_CATEGORY <= images_per_category <= MAX_IMAGES_PER_CATEGORY:
        raise SpairstoreError(
            f"images_per_category must be between {MIN_IMAGES_PER_CATEGORY} (two images per split) "
            f"and {MAX_IMAGES_PER_CATEGORY}, got {images_per_category}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SpairstoreError(f"seed must be a non-negative integer, got {seed!r}")
    if categories is None:
        cats = CATEGORIES
    else:
        categories = [categories] if isinstance(categories, str) else list(categories)
        unknown = [c for c in categories if c not in CATEGORIES]
        if unknown:
            raise SpairstoreError(f"unknown categor{'y' if len(unknown) == 1 else 'ies'} "
                                  f"{', '.join(map(repr, unknown))}; known: {', '.join(CATEGORIES)}")
        if not categories:
            raise SpairstoreError("categories is empty: name at least one category")
        cats = tuple(c for c in CATEGORIES if c in set(categories))  # the dataset's (sorted) order
    if out_dir.exists():
        if not out_dir.is_dir():
            raise SpairstoreError(f"{out_dir} exists and is not a directory")
        if any(out_dir.iterdir()):
            raise SpairstoreError(f"{out_dir} exists and is not empty; choose a new or empty directory")
    return cats


def _split_sizes(n: int) -> dict[str, int]:
    val = max(2, round(n * _SPLIT_SHARE["val"]))
    test = max(2, round(n * _SPLIT_SHARE["test"]))
    return {"trn": n - val - test, "val": val, "test": test}


def synthesize(out_dir: str | Path, images_per_category: int = 12, categories: Sequence[str] | None = None,
               seed: int = 0, progress: bool = False) -> SynthSummary:
    """Write a synthetic SPair-71k into ``out_dir`` (created; must not exist or be empty).

    ``images_per_category`` images for each of ``categories`` (default all 18; written in the dataset's
    sorted order whatever order is given). The default (12) takes a few seconds; 100 gives the real
    dataset's scale (1,800 images, about 71k pairs).

    Splits are image-disjoint, about 55 / 18 / 27 % of each category's images in trn / val / test.
    Pairs are every ordered pair of distinct images of a category within a split that share at least
    one visible keypoint, both directions. Pair ids follow the real dataset's numbering, found on the
    real files: in each split a counter runs over all ordered (source, target) candidates, category by
    category (sorted), sources then targets in name order, starting at 0; self-pairs take an id,
    pairs without a common keypoint take none. Ids therefore start at 1 and have a gap at every
    self-pair.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    cats = _check_args(out_dir, images_per_category, categories, seed)
    n = int(images_per_category)
    names = _names(cats, n, int(seed))

    out_dir.mkdir(parents=True, exist_ok=True)
    for sub in ("JPEGImages", "Segmentation", "ImageAnnotation"):
        for c in cats:
            (out_dir / sub / c).mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        (out_dir / "PairAnnotation" / split).mkdir(parents=True, exist_ok=True)
    for layout in ("large", "small"):
        (out_dir / "Layout" / layout).mkdir(parents=True, exist_ok=True)

    anns: dict[tuple[str, str], dict[str, Any]] = {}
    bar = tqdm(total=n * len(cats), desc="synth images", unit="img", disable=not progress)
    for c in cats:
        for name, year in names[c]:
            jpg, png, ann = _render(c, name, year, int(seed))
            (out_dir / "JPEGImages" / c / f"{name}.jpg").write_bytes(jpg)
            (out_dir / "Segmentation" / c / f"{name}.png").write_bytes(png)
            (out_dir / "ImageAnnotation" / c / f"{name}.json").write_text(json.dumps(ann), encoding="ascii")
            anns[(c, name)] = ann
            bar.update()
    bar.close()

    # Image-disjoint splits: a seeded shuffle of each category's images.
    sizes = _split_sizes(n)
    members: dict[str, dict[str, list[str]]] = {s: {} for s in SPLITS}
    for c in cats:
        order = [names[c][int(i)][0] for i in np.random.default_rng(_stable_seed("split", seed, c)).permutation(n)]
        at = 0
        for s in SPLITS:
            members[s][c] = sorted(order[at:at + sizes[s]])
            at += sizes[s]

    # Visible keypoint slots as bit sets: a pair exists when the two sets intersect.
    bits = {key: sum(1 << int(k) for k, v in a["kps"].items() if v is not None) for key, a in anns.items()}
    counts: dict[str, int] = {}
    total_candidates = sum(len(members[s][c]) ** 2 for s in SPLITS for c in cats)
    bar = tqdm(total=total_candidates, desc="synth pairs", unit="pair", disable=not progress)
    for split in SPLITS:
        pair_dir = out_dir / "PairAnnotation" / split
        stems: list[str] = []
        next_id = 0
        for c in cats:
            imgs = members[split][c]
            for a in imgs:
                for b in imgs:
                    if a == b:
                        next_id += 1  # the real data spends an id on every self-pair
                    elif bits[(c, a)] & bits[(c, b)]:
                        pair = pair_annotation(anns[(c, a)], anns[(c, b)], next_id)
                        next_id += 1
                        (pair_dir / f"{pair['filename']}.json").write_text(json.dumps(pair), encoding="ascii")
                        stems.append(pair["filename"])
                bar.update(len(imgs))
        # Layout files end every line with "\n", the last included, as the real ones do.
        (out_dir / "Layout" / "large" / f"{split}.txt").write_text("".join(s + "\n" for s in stems))
        pick = np.random.default_rng(_stable_seed("small", seed, split)).random(len(stems)) < _SMALL_SHARE
        (out_dir / "Layout" / "small" / f"{split}.txt").write_text(
            "".join(s + "\n" for s, p in zip(stems, pick) if p))
        counts[split] = len(stems)
    bar.close()
    return SynthSummary(out_dir=out_dir, images=len(anns), pairs=counts, seconds=time.perf_counter() - start)
