"""Evaluation: PCK protocols, prediction files, methods, reports, dataset statistics and pictures."""
