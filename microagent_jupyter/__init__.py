"""Jupyter surface of microagent: IPython magics, live widgets and a jupyter-server REST extension.

Built only on :mod:`microagent_engine`'s Python API (the engine never imports Jupyter).

* ``%load_ext microagent_jupyter`` registers ``%microagent`` / ``%%microagent`` (see :mod:`.magics`).
* :class:`~microagent_jupyter.widgets.WorkspaceStatusWidget`, :class:`~microagent_jupyter.widgets.SerialLogWidget`.
* The server extension serves ``<base_url>/microagent/api/`` (see :mod:`.server`).
"""

from __future__ import annotations

from typing import Any

from ._version import __version__  # noqa: F401 (the package's version)


def load_ipython_extension(ipython: Any) -> None:
    from .magics import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    from .magics import unload_ipython_extension as unload

    unload(ipython)


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "microagent_jupyter"}]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    from .server import load_jupyter_server_extension

    load_jupyter_server_extension(serverapp)


def __getattr__(name: str) -> Any:  # lazy: importing the package must not pull in IPython or tornado
    if name == "MicroagentCellError":
        from .magics import MicroagentCellError

        return MicroagentCellError
    if name == "MicroagentMagics":
        from .magics import MicroagentMagics

        return MicroagentMagics
    if name in ("WorkspaceStatusWidget", "SerialLogWidget"):
        from . import widgets

        return getattr(widgets, name)
    if name == "MicroagentConfig":
        from .server.config import MicroagentConfig

        return MicroagentConfig
    raise AttributeError(name)


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    """Where JupyterLab finds the prebuilt side panel (``jupyter labextension develop`` uses it too)."""
    return [{"src": "labextension", "dest": "microagent-jupyter"}]
