"""PASCAL VOC facts shared by the datasets built on VOC images (SPair-71k, PF-PASCAL) and by the pair
naming all three VOC-lineage converters (and PF-WILLOW) use.

Facts only, no parsing: class order and indices, the colour map of VOC's class-index PNGs, and the
SPair-71k pair stem.
"""
from __future__ import annotations

from functools import lru_cache

#: The 20 PASCAL VOC classes in VOC order: class index ``k`` (1-based, as in the segmentation PNGs and
#: PF-PASCAL's pair CSVs) is ``CLASSES[k - 1]``; index 0 is the background.
CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
#: PASCAL VOC class index of each class, as written in the segmentation PNGs.
CLASS_INDEX = {c: i for i, c in enumerate(CLASSES, start=1)}


def pair_stem(pair_id: int, src_name: str, trg_name: str, category: str) -> str:
    """SPair-71k's name of a pair, ``<pair id, 6 digits>-<source>-<target>:<category>`` (the pair file's
    stem there; PF-PASCAL and PF-WILLOW pairs are named the same way in a store)."""
    return f"{pair_id:06d}-{src_name}-{trg_name}:{category}"


@lru_cache(maxsize=None)
def palette() -> list[int]:
    """The PASCAL VOC colour map (``[r, g, b] * 256``, for ``Image.putpalette``): class ``k`` is drawn in
    the colour whose bits interleave those of ``k``, so class-index PNGs look like VOC's when viewed."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= (c & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal
