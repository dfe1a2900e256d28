"""Multi-step work the commands run (grids, robustness, predict, the demo): below cli/, above the models."""
