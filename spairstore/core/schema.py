"""Store schema v1: the fields, their types and where they live.

Like FFCV, every field is declared with an explicit dtype and per-record shape. *Hot* fields are read
per sample on the training path: they are written contiguous and unfiltered so that the reader can
memory-map them. All other fields are small tables, loaded whole into RAM when a store is opened.

Layout (identical for every backend; ``N`` images, ``P`` pairs of a split, ``S`` store size,
``K`` keypoint slots per image, ``M`` most keypoints of any pair, ``F`` files in the manifest)::

    images/pixels        uint8   (N, S, S, 3)  hot   letterboxed RGB, store pixels
    images/mask          uint8   (N, S, S)     hot   class-index mask, letterboxed with nearest
    images/image_blob    uint8   (sum bytes,)  hot   original image files (JPEG/PNG), concatenated
    images/image_offsets int64   (N + 1,)            image i is blob[offsets[i]:offsets[i+1]]
    images/mask_blob, images/mask_offsets            original mask PNG files, likewise
    images/name          S       (N,)                file stem (UTF-8)
    images/category      int16   (N,)                index into ``categories``
    images/size          int32   (N, 2)              original width, height
    images/scale         float64 (N, 2)              sx, sy:  p_store = p_orig * scale + offset
    images/offset        float64 (N, 2)              ox, oy   (x, y order, pixels)
    images/bbox          float32 (N, 4)              x1, y1, x2, y2, original pixels (as annotated)
    images/keypoints     float32 (N, K, 2)           original pixels, NaN = absent
    images/azimuth, pose, truncated, occluded, difficult, depth   int8 (N,)  (-1 = unknown)
    images/splits        uint8   (N,)                bit s set when split s uses the image
    images/crc32_<field> uint32  (N,)                CRC-32 of each payload record, at pack time
    pairs/<split>/pair_id int32 (P,)   stem S (P,)   category int16 (P,)
    pairs/<split>/src, trg int32 (P,)                image rows
    pairs/<split>/n_kps int16 (P,)  kps_ids int16 (P, M) (-1 padded)
    pairs/<split>/src_kps, trg_kps float32 (P, M, 2) original pixels, NaN padded
    pairs/<split>/viewpoint, scale, truncation, occlusion, mirror, flip int8 (P,)  small bool (P,)
    pairs/<split>/subset int8 (P,)                   index into ``subset_names``; -1 = none (since 1.1)
    manifest/path S (F,)  manifest/size int64 (F,)  manifest/sha256 S64 (F,)
    categories S (C,)
    features/<name>/data float16 (N, C, h, w) hot    one feature set per name (see geometry.py)
    features/<name>/crc32 uint32 (N,)                CRC-32 of each image's map, at commit time

Checksums (what ``spairstore verify`` checks): every hot array ``<group>/<field>`` has a companion
``<group>/crc32_<field>`` (``<group>/crc32`` for a ``data`` field) holding the CRC-32 of each record -- a
row, or for a ``*_blob`` array the byte range its ``*_offsets`` delimit; every other array has its
whole-array CRC-32 in ``table_crc32``.

Root attributes (JSON values): ``format``, ``format_version``, ``dataset``, ``image_size``,
``num_keypoints``, ``splits``, ``pose_names``, ``build_config``, ``notes``, ``created_by``,
``feature_sets`` (name -> geometry and provenance of ``features/<name>/data``), ``table_crc32``
(array path -> CRC-32 of its bytes, for every array that is not hot), ``skipped`` (the source items
``pack --on-error skip`` left out: ``{kind, key, path, reason}`` each) and, where the dataset defines
left/right keypoints, ``keypoint_flip`` (category -> permutation of the K slots under a horizontal
flip: slot k of the mirrored image shows the part of slot ``perm[k]``).
Since 1.1: ``pair_list_sha256`` (split -> SHA-256 of its ordered pair list, one line
``<split>\\t<pair id>\\t<src category>/<src name>\\t<trg category>/<trg name>\\n`` per pair in table
order: :func:`spairstore.core.records.pair_list_sha256`; equal hashes, the same pairs evaluated) and,
where the dataset has them, ``subset_names`` (names of the ``subset`` labels, e.g. AP-10K's
``intra-species``, ``cross-species``, ``cross-family``) and ``category_groups`` (grouping name -> the
group of each category in ``categories`` order, e.g. AP-10K's ``family`` of each species). Evaluation
reports PCK per subset and per group of each grouping.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

FORMAT_NAME = "spairstore"
#: (major, minor). Readers refuse a newer major version; minor versions only add fields (1.1: the pair
#: ``subset`` column and the ``pair_list_sha256``, ``subset_names``, ``category_groups`` attributes).
FORMAT_VERSION = (1, 1)

#: Hot per-image arrays of ``images/`` (each record CRC-32'd at pack time), and the blobs among them
#: whose records are byte ranges ``<b>_blob[<b>_offsets[i]:<b>_offsets[i + 1]]``.
PAYLOAD_FIELDS = ("pixels", "mask", "image_blob", "mask_blob")
BLOB_FIELDS = ("image", "mask")


def is_hot(path: str) -> bool:
    """Whether array ``path`` is read per record (a payload or a feature set): such arrays are stored
    uncompressed and read from their raw bytes; every other array is a table loaded whole (at open, or
    on first use for pair tables and the manifest)."""
    return ((path.startswith("features/") and path.endswith("/data"))
            or path in {f"images/{f}" for f in PAYLOAD_FIELDS})


#: Difficulty level names, indexed by the stored label.
LEVELS = {
    "viewpoint": ("easy", "medium", "hard"),
    "scale": ("easy", "medium", "hard"),
    "truncation": ("none", "src", "trg", "both"),
    "occlusion": ("none", "src", "trg", "both"),
}


@dataclass(frozen=True)
class Field:
    """One array of the store."""

    path: str  #: location inside the store, e.g. ``images/pixels``
    dtype: np.dtype
    row_shape: tuple[int, ...]  #: shape of one record; the array is ``(rows, *row_shape)``
    hot: bool = False  #: read per sample: contiguous, unfiltered, memory-mapped


def image_fields(size: int, num_keypoints: int) -> list[Field]:
    """The per-image fields of a store of letterbox size ``size``."""
    u8, i8 = np.dtype("uint8"), np.dtype("int8")
    return [
        Field("images/pixels", u8, (size, size, 3), hot=True),
        Field("images/mask", u8, (size, size), hot=True),
        Field("images/category", np.dtype("int16"), ()),
        Field("images/size", np.dtype("int32"), (2,)),
        Field("images/scale", np.dtype("float64"), (2,)),
        Field("images/offset", np.dtype("float64"), (2,)),
        Field("images/bbox", np.dtype("float32"), (4,)),
        Field("images/keypoints", np.dtype("float32"), (num_keypoints, 2)),
        *(Field(f"images/{n}", i8, ()) for n in ("azimuth", "pose", "truncated", "occluded", "difficult", "depth")),
        Field("images/splits", u8, ()),
        *(Field(f"images/crc32_{n}", np.dtype("uint32"), ()) for n in PAYLOAD_FIELDS),
    ]


#: int8 label columns of a pair table (``subset`` since format 1.1).
PAIR_LABELS = ("viewpoint", "scale", "truncation", "occlusion", "mirror", "flip", "subset")
#: Label of a pair table column that a store of an older minor version lacks: column -> (version, value).
ADDED_PAIR_LABELS = {"subset": ((1, 1), -1)}


def format_version(attrs: dict) -> tuple[int, int]:
    """``(major, minor)`` of a store's ``format_version`` attribute (``(0, 0)`` where unreadable)."""
    try:
        major, minor = str(attrs.get("format_version", "")).split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return (0, 0)

#: A byte-string field of any length (names, stems, paths).
BYTES = np.dtype("S")
#: Widest text a table may declare, in bytes: names, stems and source paths are short (PATH_MAX is 4096),
#: and each string of a table costs its declared width in memory, written or not.
MAX_TEXT_BYTES = 4096


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
    """Every array a store with these ``attrs`` must hold, with the dtype and row shape it must have
    (``rows`` of each is checked by :func:`check_layout`). ``shapes`` supplies only the sizes the
    attributes do not fix (pair-table width, feature-map shape)."""
    size, k = int(attrs["image_size"]), int(attrs["num_keypoints"])
    u8, i8, i16, i32 = (np.dtype(t) for t in ("uint8", "int8", "int16", "int32"))
    fields = [f for f in image_fields(size, k)]
    fields += [Field("images/name", BYTES, ()), Field("categories", BYTES, ())]
    fields += [Field(f"images/{b}_{part}", dt, ()) for b in BLOB_FIELDS
               for part, dt in (("blob", u8), ("offsets", np.dtype("int64")))]
    fields += [Field("manifest/path", BYTES, ()), Field("manifest/size", np.dtype("int64"), ()),
               Field("manifest/sha256", np.dtype("S64"), ())]
    for split in attrs["splits"]:
        p = f"pairs/{split}/"
        width = shapes.get(p + "kps_ids", ((0, 0),))[0]
        m = (width[1],) if len(width) == 2 else (-1,)
        fields += [Field(p + "pair_id", i32, ()), Field(p + "stem", BYTES, ()), Field(p + "category", i16, ()),
                   Field(p + "src", i32, ()), Field(p + "trg", i32, ()), Field(p + "n_kps", i16, ()),
                   Field(p + "kps_ids", i16, m), Field(p + "src_kps", np.dtype("float32"), (*m, 2)),
                   Field(p + "trg_kps", np.dtype("float32"), (*m, 2)), Field(p + "small", np.dtype(bool), ()),
                   *(Field(p + label, i8, ()) for label in PAIR_LABELS
                     if format_version(attrs) >= ADDED_PAIR_LABELS.get(label, ((0, 0),))[0])]
    for name in sorted({k.split("/")[1] for k in shapes if k.startswith("features/") and k.count("/") == 2}):
        data = shapes.get(f"features/{name}/data", ((), None))[0]
        fields.append(Field(f"features/{name}/data", np.dtype("float16"),
                            tuple(data[1:]) if len(data) == 4 else (-1, -1, -1), hot=True))
        if crc_array(f"features/{name}/data") in shapes:
            fields.append(Field(crc_array(f"features/{name}/data"), np.dtype("uint32"), ()))
    return fields


def _check_attrs(attrs: dict) -> list[str]:
    def is_list_of_str(v: object) -> bool:
        return isinstance(v, list) and all(isinstance(x, str) for x in v)

    def is_int(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    checks = {
        "dataset": lambda v: isinstance(v, str),
        "image_size": lambda v: is_int(v) and 1 <= v <= 1 << 16,
        "num_keypoints": lambda v: is_int(v) and 0 <= v <= 1 << 12,
        "splits": lambda v: is_list_of_str(v) and len(set(v)) == len(v) and all(s and "/" not in s for s in v),
        "pose_names": is_list_of_str,
    }
    optional = {
        "notes": is_list_of_str,
        "feature_sets": lambda v: isinstance(v, dict),
        "table_crc32": lambda v: isinstance(v, dict) and all(is_int(c) and 0 <= c < 1 << 32 for c in v.values()),
        "skipped": lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v),
        "pair_list_sha256": lambda v: isinstance(v, dict) and all(
            isinstance(h, str) and len(h) == 64 for h in v.values()),
        "subset_names": is_list_of_str,
        "category_groups": lambda v: isinstance(v, dict) and all(is_list_of_str(g) for g in v.values()),
    }
    problems = [f"attribute {k!r} is missing" for k in checks if k not in attrs]
    problems += [f"attribute {k!r} has an invalid value {attrs[k]!r:.60}"
                 for k, ok in (*checks.items(), *optional.items()) if k in attrs and not ok(attrs[k])]
    return problems


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
            problems.append(f"{f.path} is missing")
            continue
        shape, dtype = shapes[f.path]
        ok_dtype = dtype.kind == "S" if f.dtype == BYTES else dtype == f.dtype
        if not ok_dtype:
            problems.append(f"{f.path} has dtype {dtype}, expected {f.dtype}")
        elif f.dtype == BYTES and dtype.itemsize > MAX_TEXT_BYTES:
            problems.append(f"{f.path} declares strings of {dtype.itemsize:,} bytes (at most {MAX_TEXT_BYTES})")
        if tuple(shape[1:]) != f.row_shape or len(shape) != 1 + len(f.row_shape):
            problems.append(f"{f.path} has shape {shape}, expected (rows, {', '.join(map(str, f.row_shape))})")
            continue
        group = f.path.rsplit("/", 1)[0]
        rows = {"images/mask": (0, n), "images/image_offsets": (n + 1,), "images/mask_offsets": (n + 1,)}.get(f.path)
        if rows is None and (group == "images" and not f.path.endswith("_blob") or f.path.startswith("features/")):
            rows = (n,)
        if rows is None and group.startswith("pairs/"):
            rows = (shapes[group + "/pair_id"][0][0],) if group + "/pair_id" in shapes else None
        if rows is None and group == "manifest":
            rows = (shapes["manifest/path"][0][0],)
        if rows is not None and shape[0] not in rows:
            problems.append(f"{f.path} has {shape[0]} rows, expected {' or '.join(map(str, rows))}")
    return problems


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
