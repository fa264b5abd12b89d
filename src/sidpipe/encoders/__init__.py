"""Encoder-based personalization baselines (no per-subject training)."""
