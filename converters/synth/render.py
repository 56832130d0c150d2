"""The drawing machinery of the synthetic datasets: 3D object templates seen from a chosen yaw, keypoint
markers, textured backgrounds, truncation and occlusion, sensor noise.

A class's :func:`template` is an ellipsoid body with a head, a skeleton of limbs and keypoint slots on
the body's surface. Each keypoint slot is drawn as a marker of its own (fill colour, shape, inner dot)
that looks the same in every image and class, whatever the view. An image is drawn in two steps, so
that a dataset's synthesizer can draw its own labels from the same random stream in between:
:func:`view` (the template rotated to a yaw, a little elevation and in-plane roll, its colours and the
background) and :func:`place` (position and scale, then truncation and occlusion, redrawn until enough
keypoints show, then noise). Coordinates are image pixels, ``(x, y)``: a keypoint is the pixel at
column ``x``, row ``y`` its marker is centred on.
"""
from __future__ import annotations

import io
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from spairstore.core.errors import SpairstoreError

#: Keypoint slots with a marker style of their own.
MARKER_SLOTS = 30
JPEG_QUALITY = 90
#: A keypoint faces the camera when its surface normal's depth component exceeds this; slightly
#: negative so points on the silhouette count as visible from both sides.
FACING = -0.3

# Marker look of each of the 30 keypoint slots: a (fill, shape, inner dot) triple unique to the slot,
# fixed for all categories and images, so a slot's local pattern is the same everywhere.
_PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (255, 255, 255),
)
_SHAPES = ("circle", "square", "triangle", "diamond", "hexagon")


def _marker_styles() -> tuple[tuple[tuple[int, int, int], str, tuple[int, int, int]], ...]:
    combos = [(f, s) for s in range(len(_SHAPES)) for f in range(len(_PALETTE))]
    order = np.random.default_rng(20190701).permutation(len(combos))[:MARKER_SLOTS]
    styles = []
    for i in order:
        f, s = combos[int(i)]
        inner = (f * 7 + s * 5 + 3) % len(_PALETTE)
        if inner == f:
            inner = (inner + 1) % len(_PALETTE)
        styles.append((_PALETTE[f], _SHAPES[s], _PALETTE[inner]))
    return tuple(styles)


MARKERS = _marker_styles()


@dataclass(frozen=True)
class SynthSummary:
    """What a synthesizer (:func:`converters.synth.synthesize`) wrote."""

    out_dir: Path
    images: int  #: images written (a JPEG and an annotation each, plus a mask where the dataset has them)
    pairs: dict[str, int]  #: pair files written per split
    seconds: float  #: wall-clock time taken
    notes: tuple[str, ...] = ()  #: what the user should know, e.g. why a split is empty

    def __str__(self) -> str:
        pairs = ", ".join(f"{s} {n:,}" for s, n in self.pairs.items())
        return "\n".join([f"wrote {self.images:,} images and pairs ({pairs}) to {self.out_dir} in {self.seconds:.1f} s",
                          *(f"  note: {n}" for n in self.notes)])


@dataclass(frozen=True)
class Template:
    """An object class in its own frame: x right, y up, z towards the viewer at yaw 0."""

    slots: tuple[int, ...]  #: keypoint slot ids used by the category
    points: np.ndarray  #: (K, 3) keypoint positions on the body surface
    normals: np.ndarray  #: (K, 3) unit outward normals there
    axes: np.ndarray  #: (3,) body ellipsoid semi-axes
    head: np.ndarray  #: (3,) head centre
    head_radius: float
    edges: tuple[tuple[int, int], ...]  #: limbs between keypoints (indices into slots)
    body_rgb: np.ndarray  #: (3,) float body colour


def stable_seed(*parts: Any) -> int:
    """A seed from strings/ints that does not depend on Python's hash randomisation."""
    return zlib.crc32("\x1f".join(map(str, parts)).encode())


@lru_cache(maxsize=None)
def template(key: str, k: int) -> Template:
    """The object of class ``key`` with keypoint slots ``0..k-1`` (k <= 20 keeps the markers apart).
    Fixed per class, independent of the user's seed: a class always looks the same."""
    rng = np.random.default_rng(stable_seed("template", key))
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
    return Template(
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


def draw_marker(draws: Sequence[ImageDraw.ImageDraw], fills: Sequence[Any], slot: int,
                 x: float, y: float, r: float) -> None:
    """Slot ``slot``'s marker centred on (x, y): shape outlined in black, inner dot on top.

    ``draws[0]`` is the RGB image (drawn in the marker's colours); the others are label images, filled
    with the matching entry of ``fills``.
    """
    colour, shape, inner = MARKERS[slot]
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



@dataclass(frozen=True)
class View:
    """A template seen from one direction, in units of the object (origin at its body centre, y down),
    with its colours and the image's background: what :func:`place` draws."""

    template: Template
    width: int  #: image size, pixels
    height: int
    points: np.ndarray  #: (K, 3) rotated keypoints (z towards the viewer: the drawing order)
    facing: np.ndarray  #: (K,) bool, keypoints on the side facing the camera
    head: np.ndarray  #: (3,) rotated head centre
    silhouette: np.ndarray  #: (48, 2) outline of the body
    keypoints: np.ndarray  #: (K, 2) projected keypoints
    head_centre: np.ndarray  #: (2,)
    lo: np.ndarray  #: (2,) top-left of the object's extent
    extent: np.ndarray  #: (2,) width, height of the object
    body: tuple[int, int, int]
    limb: tuple[int, int, int]
    head_colour: tuple[int, int, int]
    background: Image.Image


def view(tpl: Template, rng: np.random.Generator, w: int, h: int, yaw: float) -> View:
    """``tpl`` turned by ``yaw`` (radians), with a random elevation, in-plane roll and colour jitter,
    over a random ``w x h`` background."""
    rot = _rotation(yaw, math.radians(rng.uniform(-10, 25)))
    roll = math.radians(rng.uniform(-12, 12))
    cr, sr = math.cos(roll), math.sin(roll)
    inplane = np.array([[cr, -sr], [sr, cr]])

    pts = tpl.points @ rot.T
    normals = tpl.normals @ rot.T
    facing = normals[:, 2] > FACING
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
    return View(tpl, w, h, pts, facing, head, sil_u, pts_u, head_u, lo, extent, body, limb, head_col, background)


@dataclass(frozen=True)
class Drawn:
    """One drawn image and where its keypoints are."""

    image: Image.Image  #: RGB, with sensor noise
    mask: Image.Image  #: mode L, the object's pixels set to the label :func:`place` was given, 0 elsewhere
    keypoints: np.ndarray  #: (K, 2) int, pixel of each slot's marker centre (x, y)
    visible: np.ndarray  #: (K,) bool, the marker is drawn, in the frame and not hidden
    truncated: int  #: 1 where the object reaches the frame's edge
    occluded: int  #: 1 where an occluder hides a keypoint that would show


def place(v: View, rng: np.random.Generator, label: int, p_truncated: float, p_occluded: float,
          min_visible: int) -> Drawn:
    """Draw ``v`` at a random position and scale, truncated (reaching past the frame) with probability
    ``p_truncated`` and partly covered by an occluder with probability ``p_occluded``; placement is
    redrawn until at least ``min_visible`` keypoints show."""
    w, h, tpl, pts, facing, head = v.width, v.height, v.template, v.points, v.facing, v.head
    sil_u, pts_u, head_u, lo, extent = v.silhouette, v.keypoints, v.head_centre, v.lo, v.extent
    body, limb, head_col, background, hr = v.body, v.limb, v.head_colour, v.background, tpl.head_radius
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
        if hard_ok and rng.random() < p_truncated:
            ax = int(rng.integers(2))
            out = rng.uniform(0.15, 0.45) * o_ext[ax]
            lim = (w, h)[ax]
            centre[ax] = -o_lo[ax] - out if rng.random() < 0.5 else lim - 1 - o_lo[ax] - o_ext[ax] + out
        occlude = hard_ok and rng.random() < p_occluded

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
                mdraw.polygon(geom, fill=label)
            else:
                draw.ellipse(geom, fill=head_col, outline=limb, width=2)
                mdraw.ellipse(geom, fill=label)
        kp = pts_u * scale + centre
        lw = max(2, int(round(0.05 * size)))
        for a, b in tpl.edges:
            if facing[a] and facing[b]:
                seg = [tuple(kp[a]), tuple(kp[b])]
                draw.line(seg, fill=limb, width=lw)
                mdraw.line(seg, fill=label, width=lw)
        rounded = np.rint(kp).astype(int)
        for i in np.argsort(pts[:, 2], kind="stable"):  # far to near: near markers win overlaps
            if facing[i]:
                x, y = rounded[i]
                draw_marker((draw, mdraw, idraw), (label, int(tpl.slots[i]) + 1), tpl.slots[i], x, y, r)

        # Truncated: the drawn object (before any occluder covers it) reaches the frame's edge.
        ox0, oy0, ox1, oy1 = mask.getbbox()
        truncated = int(ox0 == 0 or oy0 == 0 or ox1 == w or oy1 == h)
        inframe = (rounded[:, 0] >= 1) & (rounded[:, 0] <= w - 2) & (rounded[:, 1] >= 1) & (rounded[:, 1] <= h - 2)
        candidates = np.flatnonzero(facing & inframe)
        slot_of = np.asarray(tpl.slots)[candidates] + 1
        rows, cols = rounded[candidates, 1], rounded[candidates, 0]
        shown = np.asarray(ids)[rows, cols] == slot_of  # not hidden by a nearer marker
        if occlude and len(candidates) > min_visible:
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
        if visible.sum() >= min_visible:
            break
    else:  # pragma: no cover - attempts without truncation/occlusion always succeed in practice
        raise RuntimeError("synth: could not place the object")

    # Sensor noise over everything (markers included), so no two renderings of a slot are identical.
    arr = np.asarray(img, dtype=np.int16) + rng.integers(-9, 10, (h, w, 3), dtype=np.int16)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    return Drawn(img, mask, rounded, visible, truncated, occluded)


def jpeg(img: Image.Image) -> bytes:
    """``img`` as JPEG bytes at a fixed quality (no metadata: the same pixels give the same bytes)."""
    out = io.BytesIO()
    img.save(out, "JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def check_args(out_dir: Path, images_per_category: Any, categories: Sequence[str] | None, seed: Any,
               known: Sequence[str], fewest: int, most: int, why_fewest: str) -> tuple[str, ...]:
    """The arguments of a synthesizer checked (:class:`SpairstoreError` naming the bad one), and the
    categories to write: ``categories`` (default: all of ``known``) in ``known``'s order."""
    if isinstance(images_per_category, bool) or not isinstance(images_per_category, (int, np.integer)):
        raise SpairstoreError(f"images per category must be an integer, got {images_per_category!r}")
    if not fewest <= images_per_category <= most:
        raise SpairstoreError(f"images per category must be between {fewest} ({why_fewest}) and {most}, "
                              f"got {images_per_category}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SpairstoreError(f"seed must be a non-negative integer, got {seed!r}")
    if categories is None:
        cats = tuple(known)
    else:
        categories = [categories] if isinstance(categories, str) else list(categories)
        unknown = [c for c in categories if c not in known]
        if unknown:
            raise SpairstoreError(f"unknown categor{'y' if len(unknown) == 1 else 'ies'} "
                                  f"{', '.join(map(repr, unknown))}; known: {', '.join(known)}")
        if not categories:
            raise SpairstoreError("categories is empty: name at least one category")
        cats = tuple(c for c in known if c in set(categories))  # the dataset's (sorted) order
    if out_dir.exists():
        if not out_dir.is_dir():
            raise SpairstoreError(f"{out_dir} exists and is not a directory")
        if any(out_dir.iterdir()):
            raise SpairstoreError(f"{out_dir} exists and is not empty; choose a new or empty directory")
    return cats
