"""Synthetic datasets written in the native layouts the converters read (``spairstore synth``)."""
from . import ap10k
from .spair71k import MAX_IMAGES_PER_CATEGORY, MIN_IMAGES_PER_CATEGORY, SynthSummary, synthesize

#: Each synthesizer by dataset name (``synth --dataset``): ``fn(out_dir, images_per_category, categories,
#: seed, progress)``, ``images_per_category`` counting a species' images for AP-10K.
SYNTHESIZERS = {"spair71k": synthesize, "ap10k": ap10k.synthesize}

__all__ = ["MAX_IMAGES_PER_CATEGORY", "MIN_IMAGES_PER_CATEGORY", "SYNTHESIZERS", "SynthSummary", "synthesize"]
