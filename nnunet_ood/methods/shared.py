"""What several methods of a fold share, fitted once: the SD autoencoder (``Requirements(autoencoder=True)``).

The fold's state (:mod:`nnunet_ood.fold_state`) writes and reads these through this module, and each method's own
files through ``Method.state_entry`` / ``Method.load_state``: nothing outside the methods names the autoencoder.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from nnunet_ood.methods.base import FoldModels, Method


def save_shared_models(models: FoldModels, folder: str, provenance: Mapping[str, Any]) -> None:
    """Write the shared models of ``models`` into ``folder``: the SD autoencoder, if any, with its training history
    (``provenance["sd_training"]``)."""
    if models.autoencoder is not None:
        models.autoencoder.save(folder, provenance.get("sd_training"))


def load_shared_models(models: FoldModels, folder: str, methods: Sequence[Method], device: Any) -> None:
    """Read from ``folder`` into ``models`` the shared models ``methods`` need, before each method reads its own:
    the SD autoencoder when one of them requires it."""
    if any(m.requires.autoencoder for m in methods):
        from nnunet_ood.methods.sd.autoencoder import BottleneckAutoencoder

        models.autoencoder = BottleneckAutoencoder.load(folder, device)
