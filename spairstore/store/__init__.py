"""The store: container backends, the writer (records -> store), the reader, conversion and verification.

Builds on :mod:`spairstore.core` only; features, the PyTorch side and evaluation build on it.
"""
