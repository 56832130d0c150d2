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
    manifest/path S (F,)  manifest/size int64 (F,)  manifest/sha256 S64 (F,)
    categories S (C,)
    features/<name>/data float16 (N, C, h, w) hot    one feature set per name (see geometry.py)
    features/<name>/crc32 uint32 (N,)                CRC-32 of each image's map, at commit time

Root attributes (JSON values): ``format``, ``format_version``, ``dataset``, ``image_size``,
``num_keypoints``, ``splits``, ``pose_names``, ``build_config``, ``notes``, ``created_by``,
``feature_sets`` (name -> geometry and provenance of ``features/<name>/data``), and, where the dataset
defines left/right keypoints, ``keypoint_flip`` (category -> permutation of the K slots under a
horizontal flip: slot k of the mirrored image shows the part of slot ``perm[k]``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FORMAT_NAME = "spairstore"
#: (major, minor). Readers refuse a newer major version; minor versions only add fields.
FORMAT_VERSION = (1, 0)

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


#: int8 label columns of a pair table.
PAIR_LABELS = ("viewpoint", "scale", "truncation", "occlusion", "mirror", "flip")
