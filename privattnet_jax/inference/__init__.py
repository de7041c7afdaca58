"""Inference: scoring and redacting users' photos; no TFDS, no training code."""
