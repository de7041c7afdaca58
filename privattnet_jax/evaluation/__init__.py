"""Evaluation: metrics over a split, attention localisation, the report."""
