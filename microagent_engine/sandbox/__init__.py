"""Host-side confinement of a workspace's VM: the jail (namespaces, private root, uid drop, rlimits, seccomp; a
cgroup v2 per VM where the host has one) in ``jail.py``/``jail.c``/``cgroups.py``, and the network policy
(a network namespace per VM with nftables and a loopback-less uplink) in ``network.py``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_getattr

if TYPE_CHECKING:
    from .jail import CONFINE_ENV, ConfinedVM, JailError, host_summary, launcher_binary, spawn_vm

__all__ = ["CONFINE_ENV", "ConfinedVM", "JailError", "host_summary", "launcher_binary", "spawn_vm"]
#: the jail's names, imported on first use (asyncio with them): the CLI imports this package's light modules
__getattr__ = lazy_getattr(globals(), {name: "jail" for name in __all__})
