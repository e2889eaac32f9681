"""Inference: the nnU-Net predictor subclass, the per-case scorer of the methods, the run's output files."""
