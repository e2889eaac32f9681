"""Synthetic multi-domain demo dataset and the end-to-end demo."""
