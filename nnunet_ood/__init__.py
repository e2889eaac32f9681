"""nnunet-ood: out-of-distribution scores and uncertainty maps for trained nnU-Net v2 models."""

__version__ = "0.1.0"
