"""The PyTorch side: datasets over a store, batch memory, sampling, collation, augmentations, the Loader.

Imported on first use (``spairstore.PairDataset`` ...), so ``import spairstore`` does not import torch.
"""
