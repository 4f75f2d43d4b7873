"""microagent engine: microVM workspaces on ext4 block devices, with a typed Python API and a CLI.

>>> from microagent_engine import Engine
>>> engine = Engine()
>>> engine.create("demo"); engine.start("demo")
>>> engine.exec("demo", ["uname", "-r"]).stdout
"""

__version__ = "0.1.0"

from .client import ExecResult  # noqa: E402
from .errors import (  # noqa: E402
    AlreadyExists,
    Busy,
    ExecTimeout,
    GuestError,
    HostError,
    InvalidArgument,
    InvalidState,
    MicroagentError,
    NotFound,
)
from .engine import Engine, RunOptions, WorkspaceInfo  # noqa: E402
from .workspace_spec import WorkspaceSpec  # noqa: E402

__all__ = [
    "Engine", "WorkspaceSpec", "RunOptions", "WorkspaceInfo", "ExecResult", "MicroagentError", "InvalidArgument",
    "NotFound", "AlreadyExists", "InvalidState", "Busy", "HostError", "GuestError", "ExecTimeout", "__version__",
]
