"""Evaluation outputs: metric tables, plots, the format-only reference, the protocol report and run comparison."""
