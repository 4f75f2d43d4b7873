"""Host-side confinement of a workspace's VM: the jail (namespaces, private root, uid drop, rlimits, seccomp; a
cgroup v2 per VM where the host has one) in ``jail.py``/``jail.c``/``cgroups.py``, and the network policy
(a network namespace per VM with nftables and a loopback-less uplink) in ``network.py``."""

from .jail import CONFINE_ENV, ConfinedVM, JailError, host_summary, launcher_binary, spawn_vm

__all__ = ["CONFINE_ENV", "ConfinedVM", "JailError", "host_summary", "launcher_binary", "spawn_vm"]
