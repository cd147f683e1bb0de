"""Measurable checks on generated videos (e.g. does a clip show what its caption says)."""
