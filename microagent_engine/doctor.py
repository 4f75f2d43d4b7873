"""``microagent doctor``: what this host can do, and what to install for the rest."""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import TYPE_CHECKING, Any

from .errors import MicroagentError
from .guest.initramfs import busybox_path
from .guest.kernel import installed_default_kernel
from .hostinfo import INSTALL_HINTS, choose_accel, kvm_usable, require_tool
from .sandbox.network import network_capabilities
from .sandbox import host_summary, launcher_binary

if TYPE_CHECKING:
    from .workspaces import Engine


def _check(name: str, fn: Any) -> dict[str, Any]:
    try:
        detail = fn()
        return {"name": name, "ok": True, "detail": detail}
    except MicroagentError as exc:
        return {"name": name, "ok": False, "detail": str(exc)}


def diagnose(engine: "Engine") -> dict[str, Any]:
    kvm_ok, kvm_why = kvm_usable()
    accel = choose_accel()
    checks = [
        _check("qemu", lambda: engine.backend.version()),
        {"name": "kvm", "ok": kvm_ok, "optional": True,
         "detail": ("usable: " if kvm_ok else "not usable (VMs run under TCG): ") + kvm_why},
        {"name": "accelerator", "ok": True, "detail": f"{accel.accel} ({accel.reason})"},
    ]
    for tool in ("mkfs.ext4", "e2fsck", "resize2fs", "debugfs"):
        checks.append(_check(tool, lambda t=tool: require_tool(t)))
    checks.append(_check("busybox-static", lambda: str(busybox_path())))
    checks.append(_check("gcc (guest agent)", lambda: require_tool("gcc")))

    def kernel() -> str:
        override = os.environ.get("MICROAGENT_KERNEL")
        if override:
            return f"$MICROAGENT_KERNEL={override}"
        k = installed_default_kernel(engine.state_dir)
        if k:
            return f"{k.release} at {k.path}"
        require_tool("apt-get")
        has_pkg = subprocess.run(["apt-cache", "show", "linux-image-cloud-amd64"], capture_output=True).returncode == 0
        if not has_pkg:
            raise MicroagentError("not installed, and apt does not know linux-image-cloud-amd64: run apt-get update")
        return "not installed yet; installed on first create (apt-get download linux-image-cloud-amd64)"

    checks.append(_check("guest kernel", kernel))
    checks.append(_check("lz4 (kernel unpack)", lambda: require_tool("lz4")))
    mmdebstrap = _check("mmdebstrap (builtin:python image)", lambda: require_tool("mmdebstrap"))
    checks.append({**mmdebstrap, "optional": True})
    checks.append(network_capabilities())

    def state_dir() -> str:
        engine.state_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(engine.state_dir, os.W_OK):
            raise MicroagentError(f"{engine.state_dir} is not writable; pass --state-dir")
        free = shutil.disk_usage(engine.state_dir).free // (1 << 20)
        return f"{engine.state_dir} ({free} MiB free)"

    checks.append(_check("state dir", state_dir))
    checks += confinement_checks(engine)
    return {"ok": all(c["ok"] or c.get("optional") for c in checks), "accel": accel.accel, "checks": checks,
            "installHints": INSTALL_HINTS}


def confinement_checks(engine: "Engine") -> list[dict[str, Any]]:
    """How each VM's QEMU is confined on this host, and what is unavailable and why."""
    host = host_summary()
    checks = [_check("jail launcher", lambda: str(launcher_binary(engine.state_dir)))]
    if host["namespaces"]:
        ns = ", ".join(host["namespaces"])
        checks.append({"name": "vm confinement", "ok": True,
                       "detail": f"{host['uid']}; no capabilities; no_new_privs; QEMU seccomp sandbox; private root; "
                                 f"own {ns} namespaces (with --network user, the network policy's own namespace); "
                                 f"rlimits"})
    else:
        checks.append({"name": "vm confinement", "ok": False, "optional": True,
                       "detail": f"no namespaces or private root: {host['userNamespace']['detail']}; still: no_new_"
                                 f"privs, QEMU seccomp sandbox, rlimits"})
    cg = host["cgroup"]
    checks.append({"name": "vm cgroup", "ok": cg["available"], "optional": True,
                   "detail": ("available: " if cg["available"] else "unavailable (no memory/cpu/pids limits per "
                              "VM): ") + cg["detail"]})
    return checks


def render(report: dict[str, Any]) -> str:
    def mark(c: dict[str, Any]) -> str:
        return "ok " if c["ok"] else ("-- " if c.get("optional") else "NO ")

    lines = [f"{mark(c)} {c['name']:<20} {c['detail']}" for c in report["checks"]]
    lines.append("")
    how = " (hardware virtualization)." if report["accel"] == "kvm" else " (software emulation: seconds per boot)."
    lines.append(f"VMs on this host run under {report['accel'].upper()}{how}")
    if not report["ok"]:
        lines.append("Some checks failed: each line says what to install. 'make setup' installs everything.")
    return "\n".join(lines)
