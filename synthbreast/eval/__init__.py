"""Judging synthetic data: classification scenarios, metrics, fidelity."""
