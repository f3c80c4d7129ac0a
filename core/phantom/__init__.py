"""The full-body CT phantom with ground truth: its anatomy and its generator."""
