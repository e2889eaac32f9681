"""What several methods of a fold share, fitted once: the shared models they name in ``Requirements.shared``.

The fold's state (:mod:`nnunet_ood.fold_state`) writes and reads these through this module, and each method's own
files through ``Method.state_entry`` / ``Method.load_state``; the fit trains them through
:func:`required_shared_models`. Each :class:`~nnunet_ood.methods.base.SharedModel` says how it is trained, saved and
loaded: nothing outside its family knows what it is.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from nnunet_ood.methods.base import FoldModels, Method, SharedModel


def required_shared_models(methods: Iterable[Method]) -> list[SharedModel]:
    """The shared models ``methods`` require, each once, in the order the methods name them."""
    found: dict[str, SharedModel] = {}
    for method in methods:
        for shared in method.requires.shared:
            found.setdefault(shared.name, shared)
    return list(found.values())


def shares_with(method: Method, others: Iterable[Method]) -> bool:
    """Whether ``method`` requires a shared model that one of ``others`` requires too."""
    names = {s.name for s in required_shared_models(others)}
    return any(s.name in names for s in method.requires.shared)


def save_shared_models(models: FoldModels, folder: str, methods: Sequence[Method],
                       provenance: Mapping[str, Any]) -> None:
    """Write into ``folder`` the shared models of ``models`` that ``methods`` require, each with its training
    history (``provenance[shared.provenance_key]``)."""
    for shared in required_shared_models(methods):
        if models.shared.get(shared.name) is not None:
            shared.save(models.shared[shared.name], folder, provenance.get(shared.provenance_key))


def load_shared_models(models: FoldModels, folder: str, methods: Sequence[Method], device: Any) -> None:
    """Read from ``folder`` into ``models`` the shared models ``methods`` require, before each method reads its own."""
    for shared in required_shared_models(methods):
        models.shared[shared.name] = shared.load(folder, device)
