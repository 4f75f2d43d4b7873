"""Confinement of the hypervisor process: a jail (namespaces, private root, uid drop, rlimits, seccomp) and a
cgroup v2 per VM where the host has one."""

from .jail import CONFINE_ENV, ConfinedVM, JailError, host_summary, launcher_binary, spawn_vm

__all__ = ["CONFINE_ENV", "ConfinedVM", "JailError", "host_summary", "launcher_binary", "spawn_vm"]
