"""Synthetic datasets written in the native layouts the converters read (``spairstore synth``)."""
from .spair71k import MAX_IMAGES_PER_CATEGORY, MIN_IMAGES_PER_CATEGORY, SynthSummary, synthesize

__all__ = ["SynthSummary", "synthesize", "MIN_IMAGES_PER_CATEGORY", "MAX_IMAGES_PER_CATEGORY"]
