"""Packages whose public names load on first use: importing one of their submodules (the CLI's entry, the
supervisor) then does not import everything the package offers."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_getattr(namespace: dict[str, Any], homes: dict[str, str]) -> Callable[[str], Any]:
    """The module ``__getattr__`` of the package whose globals are ``namespace``: each name in ``homes`` is imported
    from its submodule there (``{"Engine": "facade"}``: ``.facade``) the first time it is asked for, then kept."""
    package = namespace["__name__"]

    def __getattr__(name: str) -> Any:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{home}", package), name)
        namespace[name] = value
        return value

    return __getattr__
