"""Distillation: the student learns the teacher's outputs (the engine, its losses, options and resumable state)."""
