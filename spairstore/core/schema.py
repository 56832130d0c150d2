"""Store schema v1: every array and root attribute of a store, declared once in :data:`FIELDS`.

Like FFCV's fields, each :class:`Field` declares its path, dtype and per-record shape, and also which
table it belongs to, its padding, coordinate frame, units, bit meanings, a one-line doc and how it is
encoded from the canonical records. Everything else is derived from these declarations: the writer's
tables (:func:`encode_table`), the layout check (:func:`store_fields`, :func:`check_layout`),
``verify``'s coverage, the description attributes every array carries (:func:`describe`) and the
README's layout table (:func:`markdown_table`, which is also the reference for this layout).

*Hot* fields are read per sample on the training path: they are written contiguous and unfiltered so
that the reader can memory-map them. All other arrays are small tables, loaded whole into RAM (at
open, or on first use for pair tables and the manifest).

Checksums (what ``spairstore verify`` checks): every hot array ``<group>/<field>`` has a companion
``<group>/crc32_<field>`` (``<group>/crc32`` for a ``data`` field) holding the CRC-32 of each record -- a
row, or for a ``*_blob`` array the byte range its ``*_offsets`` delimit; every other array has its
whole-array CRC-32 in ``table_crc32``.
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from typing import Any

import numpy as np

from .geometry import letterbox_params
from .records import DatasetRecords

FORMAT_NAME = "spairstore"
#: (major, minor). Readers refuse a newer major version; minor versions only add (1.1: the pair
#: ``subset`` column and the ``pair_list_sha256``, ``subset_names``, ``category_groups`` attributes;
#: 1.2: description attributes on every array, and HDF5 root attributes stored as plain text, integers
#: or JSON text named by ``json_attributes`` instead of JSON text throughout).
FORMAT_VERSION = (1, 2)

#: Difficulty level names, indexed by the stored label.
LEVELS = {
    "viewpoint": ("easy", "medium", "hard"),
    "scale": ("easy", "medium", "hard"),
    "truncation": ("none", "src", "trg", "both"),
    "occlusion": ("none", "src", "trg", "both"),
}

#: Tables a field belongs to, with the rows each holds: ``N`` images, ``P`` pairs of a split, ``Q``
#: categories, ``F`` source files. ``pair keypoints`` are pair rows of up to ``M`` keypoints each
#: (``M``: most keypoints of any pair), padded; ``root attrs`` are the store's root attributes.
TABLES = {"images": "N", "pairs": "P", "pair keypoints": "P", "categories": "Q", "manifest": "F",
          "features": "N", "root attrs": ""}
#: Coordinate frames: pixels of the original image, pixels of the letterboxed ``S x S`` store image.
FRAMES = ("original px", "store px", "none")
#: Root attribute types: a plain string, an integer, or a JSON value (HDF5: JSON text).
ATTR_TYPES = ("text", "int", "json")
#: A byte-string field of any length (names, stems, paths): as wide as its longest value.
BYTES = np.dtype("S")
#: Widest text a table may declare, in bytes: names, stems and source paths are short (PATH_MAX is 4096),
#: and each string of a table costs its declared width in memory, written or not.
MAX_TEXT_BYTES = 4096


@dataclass(frozen=True)
class Encoding:
    """What encoding a record needs besides the record: the store size and the indices records refer to."""

    size: int  #: store size ``S``, pixels
    category: dict[str, int]  #: category name -> index into ``categories``
    pose: dict[str, int]  #: pose name -> index into the ``pose_names`` attribute
    image_row: dict[tuple[str, str], int]  #: image key -> row
    split_bits: dict[tuple[str, str], int]  #: image key -> bit ``s`` set when split ``s`` uses it

    @classmethod
    def of(cls, records: DatasetRecords, size: int, pose_names: list[str]) -> Encoding:
        bits: dict[tuple[str, str], int] = {}
        for s, pairs in enumerate(records.pairs.values()):
            for p in pairs:
                for key in (p.src, p.trg):
                    bits[key] = bits.get(key, 0) | 1 << s
        return cls(size, {c: i for i, c in enumerate(records.categories)},
                   {p: i for i, p in enumerate(pose_names)}, records.image_index(), bits)


#: ``encode(record, encoding) -> value`` of one row (an ImageRecord, PairRecord or category name).
Encoder = Callable[[Any, Encoding], Any]


@dataclass(frozen=True)
class Field:
    """One array (or root attribute) of the store."""

    path: str  #: location, e.g. ``images/pixels``; ``{split}``/``{name}`` stand for a split / feature set
    dtype: str  #: numpy dtype name; ``S``: UTF-8 bytes as wide as the longest value; root attrs: ATTR_TYPES
    #: shape of one record; names are sizes: ``S`` store size, ``K`` keypoint slots, ``M`` (pair
    #: keypoints), ``C``, ``h``, ``w`` (feature maps)
    shape: tuple[int | str, ...] = ()
    table: str = "images"  #: one of :data:`TABLES`
    doc: str = ""  #: one line
    units: str = ""
    frame: str = "none"  #: one of :data:`FRAMES`
    padding: str = ""  #: value of absent entries (``NaN``, ``-1``), or of the letterbox border
    bits: str = ""  #: meaning of the bits of a bitmask
    hot: bool = False  #: read per sample: contiguous, unfiltered, memory-mapped
    rows: str = ""  #: rows of the array where not its table's (``N + 1``, ``bytes``, ``N or 0``)
    since: tuple[int, int] = (1, 0)  #: format version that added it
    optional: bool = False  #: a store may lack it (root attrs: not refused when absent)
    layer: bool = False  #: an annotation layer only some sources have: absent is normal, not "missing"
    #: the value of one row from its record; None where the writer computes the array otherwise
    #: (payloads and their offsets and CRC-32s while decoding, the manifest while hashing)
    encode: Encoder | None = field(default=None, compare=False, repr=False)
    check: Callable[[Any], bool] | None = field(default=None, compare=False, repr=False)  #: attr validity

    @property
    def name(self) -> str:
        return self.path.rpartition("/")[2]

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    @property
    def row_shape(self) -> tuple[int, ...]:
        """The record shape of a field whose sizes are resolved (see :func:`store_fields`)."""
        if not all(isinstance(n, int) for n in self.shape):
            raise TypeError(f"{self.path}: row shape {self.shape} has unresolved sizes")
        return tuple(int(n) for n in self.shape)

    def resolve(self, sizes: Mapping[str, int], **names: str) -> Field:
        """This field at ``path.format(**names)`` with the named sizes of its shape replaced."""
        return replace(self, path=self.path.format(**names) if names else self.path,
                       shape=tuple(sizes[n] if isinstance(n, str) else n for n in self.shape))

    @property
    def pad_value(self) -> Any:
        return self.np_dtype.type(float(self.padding))


def _tuple(*xs: str) -> Encoder:
    return lambda r, e: tuple(getattr(r, x) for x in xs)


def _attr(x: str) -> Encoder:
    return lambda r, e: getattr(r, x)


_UNKNOWN = "-1"
_IMAGES = [
    Field("images/pixels", "uint8", ("S", "S", 3), doc="letterboxed RGB image (bilinear; black border)",
          units="8-bit RGB", frame="store px", padding="0", hot=True),
    Field("images/mask", "uint8", ("S", "S"), rows="N or 0", frame="store px", padding="0", hot=True,
          doc="class-index mask letterboxed with nearest (no rows where the dataset has no masks)",
          units="class index (VOC: 0 background, 1..20 classes, 255 void)"),
    Field("images/image_blob", "uint8", rows="bytes", units="bytes", hot=True,
          doc="original image files (JPEG/PNG), concatenated byte for byte"),
    Field("images/mask_blob", "uint8", rows="bytes", units="bytes", hot=True,
          doc="original mask PNG files, concatenated byte for byte"),
    Field("images/image_offsets", "int64", rows="N + 1", units="bytes",
          doc="image i is image_blob[image_offsets[i]:image_offsets[i + 1]]"),
    Field("images/mask_offsets", "int64", rows="N + 1", units="bytes",
          doc="mask i is mask_blob[mask_offsets[i]:mask_offsets[i + 1]] (empty: no mask)"),
    Field("images/name", "S", doc="file stem (UTF-8); the image key is (category, name)",
          encode=lambda r, e: r.name.encode()),
    Field("images/category", "int16", doc="index into categories", encode=lambda r, e: e.category[r.category]),
    Field("images/size", "int32", (2,), doc="original width, height", units="pixels", frame="original px",
          encode=_tuple("width", "height")),
    Field("images/scale", "float64", (2,), doc="sx, sy: p_store = p_orig * scale + offset",
          units="store px per original px", encode=lambda r, e: letterbox_params(r.width, r.height, e.size).scale),
    Field("images/offset", "float64", (2,), doc="ox, oy: where the letterboxed image starts",
          units="pixels", frame="store px",
          encode=lambda r, e: letterbox_params(r.width, r.height, e.size).offset),
    Field("images/bbox", "float32", (4,), doc="x1, y1, x2, y2 as annotated (SPair: VOC 1-based inclusive)",
          units="pixels", frame="original px", padding="NaN", encode=_attr("bbox")),
    Field("images/keypoints", "float32", ("K", 2), doc="x, y of each keypoint slot", units="pixels",
          frame="original px", padding="NaN", encode=_attr("keypoints")),
    Field("images/extra_keypoints", "float32", ("K", 2), optional=True, layer=True, since=(1, 2), units="pixels",
          frame="original px", padding="NaN",
          doc="x, y of a second annotation's keypoints (SPair-U's unseen ones; split <s>-unseen); only where the "
              "source has that layer"),
    Field("images/azimuth", "int8", doc="SPair azimuth bin 0..7", padding=_UNKNOWN, encode=_attr("azimuth")),
    Field("images/pose", "int8", doc="index into pose_names", padding=_UNKNOWN,
          encode=lambda r, e: e.pose[r.pose]),
    *(Field(f"images/{x}", "int8", doc=f"{x} flag 0/1, as annotated", padding=_UNKNOWN, encode=_attr(x))
      for x in ("truncated", "occluded", "difficult")),
    Field("images/depth", "int8", doc="colour channels, as annotated", padding=_UNKNOWN, encode=_attr("depth")),
    Field("images/splits", "uint8", doc="which splits' pairs use the image", bits="value 1 << s: split s of splits",
          encode=lambda r, e: e.split_bits.get(r.key, 0)),
    *(Field(f"images/crc32_{x}", "uint32", doc=f"CRC-32 of each {x} record, at pack time")
      for x in ("pixels", "mask", "image_blob", "mask_blob")),
]
_LABEL_DOCS = {
    "viewpoint": "azimuth difference 0 easy, 1 medium, 2 hard",
    "scale": "bbox area ratio 0 easy, 1 medium, 2 hard",
    "truncation": "0 none, 1 source, 2 target, 3 both",
    "occlusion": "0 none, 1 source, 2 target, 3 both",
    "mirror": "SPair mirror flag",
    "flip": "PF-PASCAL training flip flag",
    "subset": "index into subset_names",
}
_P = "pairs/{split}/"
_PAIRS = [
    Field(_P + "pair_id", "int32", table="pairs", doc="pair id; the pair key is (split, pair_id)",
          encode=_attr("pair_id")),
    Field(_P + "stem", "S", table="pairs", doc="the source's name for the pair (SPair: file stem, UTF-8)",
          encode=lambda r, e: r.stem.encode()),
    Field(_P + "category", "int16", table="pairs", doc="index into categories",
          encode=lambda r, e: e.category[r.category]),
    Field(_P + "src", "int32", table="pairs", doc="image row of the source", encode=lambda r, e: e.image_row[r.src]),
    Field(_P + "trg", "int32", table="pairs", doc="image row of the target", encode=lambda r, e: e.image_row[r.trg]),
    Field(_P + "n_kps", "int16", table="pairs", doc="keypoints of the pair", encode=lambda r, e: len(r.kps_ids)),
    Field(_P + "kps_ids", "int16", ("M",), table="pair keypoints", padding="-1",
          doc="keypoint slot of each correspondence", encode=_attr("kps_ids")),
    Field(_P + "src_kps", "float32", ("M", 2), table="pair keypoints", units="pixels", frame="original px",
          padding="NaN", doc="x, y in the source image", encode=_attr("src_kps")),
    Field(_P + "trg_kps", "float32", ("M", 2), table="pair keypoints", units="pixels", frame="original px",
          padding="NaN", doc="x, y in the target image", encode=_attr("trg_kps")),
    Field(_P + "small", "bool", table="pairs", doc="member of the dataset's small layout", encode=_attr("small")),
    *(Field(_P + x, "int8", table="pairs", doc=_LABEL_DOCS[x], padding=_UNKNOWN if x != "mirror" else "",
            since=(1, 1) if x == "subset" else (1, 0), encode=_attr(x)) for x in _LABEL_DOCS),
]
_OTHER = [
    Field("categories", "S", table="categories", doc="category names (UTF-8), in index order",
          encode=lambda r, e: r.encode()),
    Field("manifest/path", "S", table="manifest", doc="source file, POSIX path relative to the dataset root"),
    Field("manifest/size", "int64", table="manifest", units="bytes", doc="size of the source file"),
    Field("manifest/sha256", "S64", table="manifest", doc="SHA-256 of the source file, hex"),
    Field("features/{name}/data", "float16", ("C", "h", "w"), table="features", hot=True,
          doc="feature map of each image; geometry in feature_sets[name]"),
    Field("features/{name}/crc32", "uint32", table="features", optional=True,
          doc="CRC-32 of each image's map, at commit time"),
]


def _is_list_of_str(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _attr_field(name: str, dtype: str, doc: str, check: Callable[[Any], bool] | None = None,
                optional: bool = True, since: tuple[int, int] = (1, 0)) -> Field:
    return Field(name, dtype, table="root attrs", doc=doc, check=check, optional=optional, since=since)


_ROOT = [
    _attr_field("format", "text", "always spairstore", optional=False),
    _attr_field("format_version", "text", "major.minor; readers refuse a newer major", optional=False),
    _attr_field("dataset", "text", "converter name, e.g. spair71k", lambda v: isinstance(v, str), optional=False),
    _attr_field("image_size", "int", "store size S, pixels", lambda v: _is_int(v) and 1 <= v <= 1 << 16,
                optional=False),
    _attr_field("num_keypoints", "int", "keypoint slots K per image", lambda v: _is_int(v) and 0 <= v <= 1 << 12,
                optional=False),
    _attr_field("splits", "json", "split names, in pair-table and splits-bit order",
                lambda v: _is_list_of_str(v) and len(set(v)) == len(v) and all(s and "/" not in s for s in v),
                optional=False),
    _attr_field("pose_names", "json", "names images/pose indexes", _is_list_of_str, optional=False),
    _attr_field("notes", "json", "what the pack found worth saying", _is_list_of_str),
    _attr_field("build_config", "json", "pack options: dataset, source_root, size, letterbox, resample, on_error"),
    _attr_field("created_by", "text", "spairstore version that wrote the store"),
    _attr_field("feature_sets", "json", "name -> geometry and provenance of features/<name>/data",
                lambda v: isinstance(v, dict)),
    _attr_field("table_crc32", "json", "array path -> CRC-32 of its bytes, for every array that is not hot",
                lambda v: isinstance(v, dict) and all(_is_int(c) and 0 <= c < 1 << 32 for c in v.values())),
    _attr_field("skipped", "json", "source items pack --on-error skip left out: {kind, key, path, reason} each",
                lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v)),
    _attr_field("keypoint_flip", "json", "category -> slot permutation under a horizontal flip (slot k of the "
                "mirrored image shows the part of slot perm[k])"),
    _attr_field("pair_list_sha256", "json", "split -> SHA-256 of its ordered pair list "
                "(spairstore.core.records.pair_list_sha256)",
                lambda v: isinstance(v, dict) and all(isinstance(h, str) and len(h) == 64 for h in v.values()),
                since=(1, 1)),
    _attr_field("subset_names", "json", "names of the pair subset labels (AP-10K: intra-species, ...)",
                _is_list_of_str, since=(1, 1)),
    _attr_field("category_groups", "json", "grouping -> group of each category, in categories order",
                lambda v: isinstance(v, dict) and all(_is_list_of_str(g) for g in v.values()), since=(1, 1)),
    _attr_field("keypoint_groups", "json", "category -> lists of two or more same-type keypoint slots (a car's "
                "four wheels): the geometry-aware subset of eval --subset geo-aware",
                lambda v: isinstance(v, dict) and all(
                    isinstance(gs, list) and all(isinstance(g, list) and len(g) >= 2 and all(_is_int(k) for k in g)
                                                 for g in gs) for gs in v.values()), since=(1, 2)),
]

#: Every array and root attribute of a store, once.
FIELDS: tuple[Field, ...] = (*_IMAGES, *_PAIRS, *_OTHER, *_ROOT)
ROOT_ATTRS: dict[str, Field] = {f.path: f for f in _ROOT}

#: Hot per-image arrays of ``images/`` (each record CRC-32'd at pack time), and the blobs among them
#: whose records are byte ranges ``<b>_blob[<b>_offsets[i]:<b>_offsets[i + 1]]``.
PAYLOAD_FIELDS = tuple(f.name for f in _IMAGES if f.hot)
BLOB_FIELDS = tuple(f.name[:-len("_blob")] for f in _IMAGES if f.hot and f.name.endswith("_blob"))
#: int8 label columns of a pair table (``subset`` since format 1.1).
PAIR_LABELS = tuple(_LABEL_DOCS)
#: Label of a pair table column that a store of an older minor version lacks: column -> (version, value).
ADDED_PAIR_LABELS = {f.name: (f.since, int(f.padding)) for f in _PAIRS if f.since > (1, 0)}


@cache
def _matcher() -> list[tuple[re.Pattern[str], Field]]:
    return [(re.compile(re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(f.path)) + "$"), f)
            for f in FIELDS if f.table != "root attrs"]


def field_of(path: str) -> Field | None:
    """The declaration of array ``path`` (e.g. ``pairs/trn/src`` -> ``pairs/{split}/src``), or None."""
    return next((f for pattern, f in _matcher() if pattern.match(path)), None)


def is_hot(path: str) -> bool:
    """Whether array ``path`` is read per record (a payload or a feature set): such arrays are stored
    uncompressed and read from their raw bytes; every other array is a table loaded whole (at open, or
    on first use for pair tables and the manifest)."""
    f = field_of(path)
    return f is not None and f.hot


def image_fields(size: int, num_keypoints: int) -> list[Field]:
    """The per-image arrays of a store of letterbox size ``size``, sizes resolved."""
    return [f.resolve({"S": size, "K": num_keypoints}) for f in _IMAGES]


def encode_table(table: str, records: Sequence[Any], enc: Encoding, sizes: Mapping[str, int] | None = None
                 ) -> dict[str, np.ndarray]:
    """The columns (by field name) of ``table`` that are encoded from records, one row per record:
    ``images`` from ImageRecords, ``pairs`` (with its ``pair keypoints``, padded to ``sizes["M"]``) from
    PairRecords, ``categories`` from category names. Text is as wide as its longest value."""
    tables = ("pairs", "pair keypoints") if table == "pairs" else (table,)
    out = {}
    for f in FIELDS:
        if f.table not in tables or f.encode is None:
            continue
        values = [f.encode(r, enc) for r in records]
        if f.dtype == "S":
            out[f.name] = np.array(values, dtype=f"S{max(map(len, values), default=1)}")
            continue
        shape = f.resolve(sizes or {}).row_shape
        if f.table == "pair keypoints":  # ragged rows, padded to the widest pair
            col = np.full((len(values), *shape), f.pad_value, dtype=f.np_dtype)
            for j, v in enumerate(values):
                col[j, :len(v)] = v
        else:
            col = np.array(values, dtype=f.np_dtype).reshape(len(values), *shape)
        out[f.name] = col
    return out


def format_version(attrs: dict) -> tuple[int, int]:
    """``(major, minor)`` of a store's ``format_version`` attribute (``(0, 0)`` where unreadable)."""
    try:
        major, minor = str(attrs.get("format_version", "")).split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return (0, 0)


def crc_array(path: str) -> str:
    """Where the per-record CRC-32s of hot array ``path`` live: ``images/pixels`` ->
    ``images/crc32_pixels``; a group's ``data`` (``features/<name>/data``) -> ``<group>/crc32``."""
    group, _, name = path.rpartition("/")
    crc = "crc32" if name == "data" else f"crc32_{name}"
    return f"{group}/{crc}" if group else crc


def blob_offsets(path: str) -> str | None:
    """The offsets array delimiting the records of a ``*_blob`` array, or None for a row array."""
    group, _, name = path.rpartition("/")
    return f"{group}/{name[:-len('_blob')]}_offsets" if name.endswith("_blob") else None


def store_fields(shapes: dict[str, tuple[tuple[int, ...], np.dtype]], attrs: dict) -> list[Field]:
    """Every array a store with these ``attrs`` must (or, ``optional``, may) hold, sizes resolved: the
    dtype and row shape it must have (``rows`` of each is checked by :func:`check_layout`). ``shapes``
    supplies only the sizes the attributes do not fix (pair-table width, feature-map shape; -1 where
    the store lacks the array that gives it)."""
    sizes = {"S": int(attrs["image_size"]), "K": int(attrs["num_keypoints"])}
    version = format_version(attrs)
    fields = [f.resolve(sizes) for f in (*_IMAGES, *_OTHER) if "{" not in f.path]
    for split in attrs["splits"]:
        width = shapes.get(f"pairs/{split}/kps_ids", ((0, 0),))[0]
        m = {"M": width[1] if len(width) == 2 else -1}
        fields += [f.resolve(m, split=split) for f in _PAIRS if version >= f.since]
    for name in sorted({k.split("/")[1] for k in shapes if k.startswith("features/") and k.count("/") == 2}):
        data = shapes.get(f"features/{name}/data", ((), None))[0]
        chw = dict(zip("Chw", data[1:])) if len(data) == 4 else dict.fromkeys("Chw", -1)
        fields += [f.resolve(chw, name=name) for f in _OTHER if f.path.startswith("features/{name}/")]
    return fields


def _check_attrs(attrs: dict) -> list[str]:
    problems = [f"attribute {k!r} is missing" for k, f in ROOT_ATTRS.items()
                if f.check is not None and not f.optional and k not in attrs]
    problems += [f"attribute {k!r} has an invalid value {attrs[k]!r:.60}" for k, f in ROOT_ATTRS.items()
                 if f.check is not None and k in attrs and not f.check(attrs[k])]
    return problems


def _rows(f: Field, shapes: dict[str, tuple[tuple[int, ...], np.dtype]], n: int) -> tuple[int, ...] | None:
    """The row counts array ``f`` may have (None: any)."""
    rows = f.rows or TABLES[f.table]
    group = f.path.rsplit("/", 1)[0]
    if rows == "P":
        return (shapes[group + "/pair_id"][0][0],) if group + "/pair_id" in shapes else None
    if rows == "F":
        return (shapes["manifest/path"][0][0],)
    return {"N": (n,), "N or 0": (0, n), "N + 1": (n + 1,)}.get(rows)


def check_layout(shapes: dict[str, tuple[tuple[int, ...], np.dtype]], attrs: dict) -> list[str]:
    """What is wrong with a store's arrays (``path -> (shape, dtype)``) and attributes against this
    schema: missing arrays, wrong dtypes, shapes or row counts. Empty when the layout is sound, so
    offsets derived from it can be memory-mapped safely."""
    problems = _check_attrs(attrs)
    if problems:
        return problems
    n = shapes.get("images/name", ((-1,), None))[0][0] if "images/name" in shapes else -1
    for split in attrs["splits"]:
        # A pair lists each keypoint slot at most once, so no pair table is wider than the slots.
        width = shapes.get(f"pairs/{split}/kps_ids", ((0, 0),))[0]
        if len(width) == 2 and width[1] > max(1, attrs["num_keypoints"]):
            problems.append(f"pairs/{split}/kps_ids declares {width[1]:,} keypoint columns, more than the "
                            f"{attrs['num_keypoints']} keypoint slots")
    for f in store_fields(shapes, attrs):
        if f.path not in shapes:
            if not f.optional:
                problems.append(f"{f.path} is missing")
            continue
        shape, dtype = shapes[f.path]
        ok_dtype = dtype.kind == "S" if f.np_dtype == BYTES else dtype == f.np_dtype
        if not ok_dtype:
            problems.append(f"{f.path} has dtype {dtype}, expected {f.np_dtype}")
        elif dtype.kind == "S" and dtype.itemsize > MAX_TEXT_BYTES:
            problems.append(f"{f.path} declares strings of {dtype.itemsize:,} bytes (at most {MAX_TEXT_BYTES})")
        if tuple(shape[1:]) != f.row_shape or len(shape) != 1 + len(f.row_shape):
            problems.append(f"{f.path} has shape {shape}, expected (rows, {', '.join(map(str, f.row_shape))})")
            continue
        rows = _rows(f, shapes, n)
        if rows is not None and shape[0] not in rows:
            problems.append(f"{f.path} has {shape[0]} rows, expected {' or '.join(map(str, rows))}")
    return problems


def describe(path: str, attrs: Mapping[str, Any]) -> dict[str, str]:
    """The description attributes of array ``path`` of a store with root attributes ``attrs``, plain
    strings: ``doc``, ``frame``, and ``units``, ``padding``, ``bits`` where the field has them (the
    split bitmask's ``bits`` name the splits: ``1: trn, 2: val, 4: test``). Empty for an unknown path."""
    f = field_of(path)
    if f is None:
        return {}
    bits = f.bits
    if path == "images/splits":
        bits = ", ".join(f"{1 << s}: {name}" for s, name in enumerate(attrs.get("splits", [])))
    out = {"doc": f.doc, "frame": f.frame, "units": f.units, "padding": f.padding, "bits": bits}
    return {k: v for k, v in out.items() if v}


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table() -> str:
    """The store layout as Markdown: one table of the arrays, one of the root attributes (the README's
    "Store layout" section shows exactly this)."""
    lines = ["| array | dtype | shape | frame | units | padding | description |", "|---" * 7 + "|"]
    for f in FIELDS:
        if f.table == "root attrs":
            continue
        rows = f.rows or TABLES[f.table]
        shape = "(" + ", ".join([rows, *map(str, f.shape)]) + ("," if not f.shape else "") + ")"
        notes = [f.doc] + ([f"bits {f.bits}"] if f.bits else []) + (["hot"] if f.hot else [])
        notes += [f"since {f.since[0]}.{f.since[1]}"] if f.since > (1, 0) else []
        notes += ["optional"] if f.optional else []
        cells = [f"`{f.path}`", f.dtype, shape, f.frame if f.frame != "none" else "", f.units, f.padding,
                 "; ".join(notes)]
        lines.append("| " + " | ".join(map(_cell, cells)) + " |")
    lines += ["", "| root attribute | type | description |", "|---" * 3 + "|"]
    for f in _ROOT:
        notes = [f.doc] + ([f"since {f.since[0]}.{f.since[1]}"] if f.since > (1, 0) else [])
        notes += [] if f.optional else ["required"]
        lines.append(f"| `{f.path}` | {f.dtype} | {_cell('; '.join(notes))} |")
    return "\n".join(lines)


def check_tables(tables: dict[str, np.ndarray], shapes: dict[str, tuple[tuple[int, ...], np.dtype]],
                 attrs: dict) -> list[str]:
    """What is wrong with the values of a store's image tables that would make a read go astray: blob
    offsets that do not delimit their blob, and indices (categories, poses) outside what they index.
    Call after :func:`check_layout` found nothing; pair tables: :func:`check_pair_table`."""
    problems = []
    for b in BLOB_FIELDS:
        off, blob_len = tables[f"images/{b}_offsets"], shapes[f"images/{b}_blob"][0][0]
        if off[0] != 0 or off[-1] != blob_len or (np.diff(off) < 0).any():
            problems.append(f"images/{b}_offsets do not delimit images/{b}_blob ({blob_len} bytes)")
    problems += _outside(tables["images/category"], "images/category", 0, len(tables["categories"]))
    problems += _outside(tables["images/pose"], "images/pose", -1, max(1, len(attrs["pose_names"])))
    return problems


def check_pair_table(split: str, table: dict[str, np.ndarray], images: int, categories: int,
                     num_keypoints: int, subsets: int = 0) -> list[str]:
    """What is wrong with the indices of split ``split``'s pair table (columns by name): image rows,
    categories, keypoint counts, slots and subsets (``subsets`` names) must lie inside what they index."""
    p = f"pairs/{split}/"
    return [*_outside(table["src"], p + "src", 0, images), *_outside(table["trg"], p + "trg", 0, images),
            *_outside(table["category"], p + "category", 0, categories),
            *_outside(table["n_kps"], p + "n_kps", 0, table["kps_ids"].shape[1] + 1),
            *_outside(table["kps_ids"], p + "kps_ids", -1, max(1, num_keypoints)),
            *(_outside(table["subset"], p + "subset", -1, subsets) if "subset" in table else [])]


def _outside(a: np.ndarray, path: str, lo: int, hi: int) -> list[str]:
    return [f"{path} holds values outside {lo}..{hi - 1}"] if a.size and (a.min() < lo or a.max() >= hi) else []


#: The one name of each per-image field, everywhere (``Store.read``, dataset ``fields=``, batch keys, ``info``,
#: ``verify``) -> the array holding it. A feature set is the field ``features/<name>`` (array ``features/<name>/data``).
FIELD_ARRAYS = {"pixels": "images/pixels", "mask": "images/mask", "image_bytes": "images/image_blob",
                "mask_bytes": "images/mask_blob"}
_ARRAY_FIELDS = {a: f for f, a in FIELD_ARRAYS.items()}


def field_of_array(path: str) -> str | None:
    """The field name of a store array (``images/pixels`` -> ``pixels``, ``features/x/data`` ->
    ``features/x``); None for an array that is no per-image field (tables, CRCs, offsets)."""
    if path.startswith("features/") and path.endswith("/data"):
        return path[:-len("/data")]
    return _ARRAY_FIELDS.get(path)


def field_name(name: str) -> str:
    """``name`` in its one spelling. Old spellings (``features:<n>``, ``features/<n>/data``,
    ``images/pixels``, ``image_blob`` ...) are accepted with a DeprecationWarning naming the new one."""
    new = name
    if name.startswith("features:"):
        new = "features/" + name[len("features:"):]
    elif name.startswith("images/") or (name.startswith("features/") and name.endswith("/data")):
        new = field_of_array(name) or name
    elif f"images/{name}" in _ARRAY_FIELDS:
        new = _ARRAY_FIELDS[f"images/{name}"]
    if new != name:
        warnings.warn(f"field {name!r} is now called {new!r}", DeprecationWarning, stacklevel=3)
    return new


def field_names(names: str | Sequence[str]) -> tuple[str, ...]:
    """Each of ``names`` in its one spelling (:func:`field_name`); a single string is one name, not its letters."""
    return tuple(field_name(n) for n in ((names,) if isinstance(names, str) else names))
