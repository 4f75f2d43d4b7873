"""microagent engine: microVM workspaces on ext4 block devices, with a typed Python API and a CLI.

>>> from microagent_engine import Engine
>>> engine = Engine()
>>> engine.create("demo"); engine.start("demo")
>>> engine.exec("demo", ["uname", "-r"]).stdout
"""

__version__ = "0.1.0"

from typing import TYPE_CHECKING

from .lazy import lazy_getattr

if TYPE_CHECKING:
    from .client import ExecResult
    from .engine import Engine, RunOptions, WorkspaceInfo
    from .errors import (AlreadyExists, Busy, ExecTimeout, GuestError, HostError, InvalidArgument, InvalidState,
                         MicroagentError, NotFound)
    from .workspace_spec import WorkspaceSpec

#: where each public name lives: imported on first use, so that importing one submodule (the supervisor, a CLI
#: command) does not import the whole engine
_HOMES = {"ExecResult": "client", "Engine": "engine", "RunOptions": "engine", "WorkspaceInfo": "engine",
          "WorkspaceSpec": "workspace_spec",
          **{n: "errors" for n in ("AlreadyExists", "Busy", "ExecTimeout", "GuestError", "HostError",
                                   "InvalidArgument", "InvalidState", "MicroagentError", "NotFound")}}

__getattr__ = lazy_getattr(globals(), _HOMES)


__all__ = [
    "Engine", "WorkspaceSpec", "RunOptions", "WorkspaceInfo", "ExecResult", "MicroagentError", "InvalidArgument",
    "NotFound", "AlreadyExists", "InvalidState", "Busy", "HostError", "GuestError", "ExecTimeout", "__version__",
]
