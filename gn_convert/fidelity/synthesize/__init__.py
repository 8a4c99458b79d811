"""Synthetic images inverted from the teacher, for recovery without enough photos."""
