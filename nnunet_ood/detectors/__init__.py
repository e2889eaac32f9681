"""Detectors that score pooled per-patch features (scikit-learn style: fit, then score)."""
