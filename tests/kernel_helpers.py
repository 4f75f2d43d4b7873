"""Helpers for the sandboxed-kernel tests (relay, sessions, browser): hostile cells and the check that their
outputs are inert, free kernel ports, and this checkout's kernelspec and provisioner entry point."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path
from typing import Any

from jupyter_conftest_helpers import REPO

KERNELS = REPO / "share" / "jupyter"
PORTS = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")

HOSTILE_CELLS = [
    'from IPython.display import HTML, SVG, Javascript, Markdown, display\n'
    'display(HTML(\'<img src=x onerror="window.__pwned=1">\'))',
    'display(HTML("<script>window.__pwned=2</script>"))',
    'display(SVG(\'<svg xmlns="http://www.w3.org/2000/svg" onload="window.__pwned=4"><rect width="1"/></svg>\'))',
    'display(Javascript("window.__pwned=3"))',
    'display(Markdown("[x](javascript:window.__pwned=5)"))',
]


def assert_inert(outputs: list[dict[str, Any]]) -> None:
    """No bundle that reaches the frontend could run code in the page."""
    for out in outputs:
        data = out.get("data", {})
        assert set(data) <= {"text/plain", "text/html", "image/svg+xml", "image/png"}, data
        rich = json.dumps({k: v for k, v in data.items() if k != "text/plain"})
        for bad in ("onerror", "onload", "<script", "javascript:", "__pwned"):
            assert bad not in rich, (bad, rich)


def local_kernel() -> tuple[Any, dict[str, Any]]:
    """A local ipykernel standing in for the guest, answering before this returns: until it has bound its ports,
    ports picked for a relay's front could be the ones it is about to bind (CI saw "Address already in use")."""
    from jupyter_client import KernelManager

    km = KernelManager(kernel_name="python3")
    km.start_kernel()
    probe = km.blocking_client()
    probe.start_channels()
    try:
        probe.wait_for_ready(timeout=120)
    finally:
        probe.stop_channels()
    info = km.get_connection_info()
    info["key"] = info["key"].decode() if isinstance(info["key"], bytes) else info["key"]
    return km, info


def free_ports() -> dict[str, int]:
    socks = [socket.socket() for _ in PORTS]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = {name: s.getsockname()[1] for name, s in zip(PORTS, socks)}
    for s in socks:
        s.close()
    return ports


def ensure_entry_point(tmp: Path) -> None:
    """The provisioner is found through its entry point, which `pip install -e .` (make setup) registers; when
    the venv was installed from another checkout, register this checkout's the same way (a dist-info on sys.path)."""
    from importlib.metadata import entry_points

    if any(ep.name == "microagent-provisioner" for ep in entry_points(group="jupyter_client.kernel_provisioners")):
        return
    dist = tmp / "microagent_sandbox_ep-0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: microagent-sandbox-ep\nVersion: 0\n")
    (dist / "entry_points.txt").write_text("[jupyter_client.kernel_provisioners]\nmicroagent-provisioner = "
                                           "microagent_jupyter.provisioner:MicroagentProvisioner\n")
    sys.path.insert(0, str(tmp))
