"""The core: what every stage shares and nothing in it depends on another stage.

Errors, letterbox and feature-cell geometry, the canonical records converters produce, the store
schema, the source manifest and text tables. Imports nothing else of spairstore (``tests/test_layering.py``).
"""
