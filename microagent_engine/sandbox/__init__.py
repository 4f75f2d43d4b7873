"""Host-side confinement of a workspace's VM: the jail (namespaces, private root, uid drop, rlimits, seccomp; a
cgroup v2 per VM where the host has one) in ``jail.py``/``jail.c``/``cgroups.py``, and the network policy
(a network namespace per VM with nftables and a loopback-less uplink) in ``network.py``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .jail import CONFINE_ENV, ConfinedVM, JailError, host_summary, launcher_binary, spawn_vm

__all__ = ["CONFINE_ENV", "ConfinedVM", "JailError", "host_summary", "launcher_binary", "spawn_vm"]


def __getattr__(name: str) -> Any:
    """The jail's names, imported on first use (asyncio with them): the engine's CLI side imports this package's
    light modules without them."""
    if name in __all__:
        from . import jail

        return getattr(jail, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
