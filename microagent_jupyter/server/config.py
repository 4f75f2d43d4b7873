"""Configuration of the server extension (traitlets): ``c.MicroagentConfig.state_dir = ...``."""

from __future__ import annotations

import os

from traitlets import Integer, List, Unicode
from traitlets.config import Configurable


class MicroagentConfig(Configurable):
    """Settings of the microagent REST API under ``<base_url>/microagent/api/``."""

    state_dir = Unicode(
        None, allow_none=True,
        help="State directory of the engine. Default: $MICROAGENT_STATE_DIR, else ~/.microagent.",
    ).tag(config=True)

    allowed_roots = List(
        Unicode(), default_value=[],
        help="Host directories from which ext4 disks and tar bundles may be attached over HTTP "
             "(--disk, --bundle, -v x.tar:/path). Empty (the default): no host path is accepted.",
    ).tag(config=True)

    max_transfer_mib = Integer(
        256, help="The largest file, in MiB, that the panel's Upload and Download move into or out of a workspace.",
    ).tag(config=True)

    def resolved_roots(self) -> list[str]:
        return [os.path.realpath(os.path.expanduser(root)) for root in self.allowed_roots if root]
