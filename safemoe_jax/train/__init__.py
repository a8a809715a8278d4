"""Training: the pure train steps, the optimiser, checkpoints, the two-phase loop and the run folder."""
