"""Recovery: convert and bring the function back within a time budget (the engine, its plan, data, state and report)."""
