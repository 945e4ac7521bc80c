"""Old import paths that still work but warn, as torchmetrics' deprecated paths do."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any


def moved(old_module: str, new_paths: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``old_module``: each name in ``new_paths`` (name -> the
    module it moved to) is imported from there with a ``FutureWarning`` naming that path."""

    def __getattr__(name: str) -> Any:
        if name not in new_paths:
            raise AttributeError(f"module {old_module!r} has no attribute {name!r}")
        warnings.warn(
            f"`{old_module}.{name}` is deprecated and will be removed; import it from "
            f"`{new_paths[name]}`",
            FutureWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(new_paths[name]), name)

    return __getattr__
