"""Calibration: fitting each GroupNorm's affine to the BatchNorm output it replaced (the engine, its
moments, the greedy order)."""
