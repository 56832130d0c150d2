"""Precomputed backbone features: ``spairstore features``.

>>> from spairstore.features import extract_features
>>> extract_features("spair.h5", backbone="efficientnet-lite0")   # adds feature set "efficientnet-lite0"
>>> extract_features("spair.h5", backbone="path/to/mine.py:make", flip=True)  # sets "mine.make", "mine.make-flip"
>>> spairstore.open("spair.h5").features("efficientnet-lite0", 0).shape     # float16 (C, h, w)

Several processes: ``torchrun --nproc-per-node N -m spairstore features spair.zarr`` (see :mod:`.extract`).
"""
from __future__ import annotations

from .backbones import BACKBONES, RANDOM_WEIGHTS, Extractor, FeatureExtractor, Flipped
from .extract import (
           FeatureSummary,
           Staging,
           StagingPart,
           commit,
           extract_features,
           extract_rows,
           make_extractor,
           partial_feature_sets,
)
from .user import UserExtractor

__all__ = ["BACKBONES", "RANDOM_WEIGHTS", "Extractor", "FeatureExtractor", "FeatureSummary", "Flipped", "Staging",
           "StagingPart", "UserExtractor", "commit", "extract_features", "extract_rows", "make_extractor",
           "partial_feature_sets"]
