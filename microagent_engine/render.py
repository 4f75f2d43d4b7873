"""Plain-text renderings shared by the CLI and the notebook's text fallbacks: tables, readiness, a workspace's
status fields. The notebook adds HTML on top; the wording and the field set live here once."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from .textsafe import safe_text


if TYPE_CHECKING:
    from .engine.store import WorkspaceInfo


def text_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """Left-aligned columns under a header, two spaces apart."""
    cells = [[str(c) for c in header]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def readiness_text(sig: dict[str, Any]) -> str:
    """``yes``/``no`` with the signal's detail or error, e.g. ``no (agent channel closed)``."""
    extra = sig.get("error") or sig.get("detail") or ""
    return ("yes" if sig.get("ready") else "no") + (f" ({extra})" if extra else "")


def summary_fields(info: "WorkspaceInfo") -> list[tuple[str, str]]:
    """What ``create`` reports: name, state, rootfs, profile, resources."""
    c, s = info.config, info.state
    return [("Workspace", c.name), ("State", s.state), ("Rootfs", str(info.root_disk)), ("Profile", c.profile),
            ("Resources", f"memory={c.memory_mib}MiB cpus={c.cpus} disk={c.size_mib}MiB")]


def status_fields(info: "WorkspaceInfo") -> list[tuple[str, str]]:
    """Every field ``status`` shows, in order, as (label, text)."""
    c, s = info.config, info.state
    fields = summary_fields(info) + [("Image", c.image), ("Backend", s.backend or "qemu")]
    if s.accel:
        fields.append(("Accelerator", f"{s.accel} ({s.accel_reason})"))
    fields += [("Network", c.network_policy.describe()), ("Restart", c.restart),
               ("Hostname", c.hostname), ("Actions", ", ".join(info.actions) or "none")]
    for att in c.attachments:
        source = att.source if att.kind == "volume" else f"{att.name}={att.source}"
        fields.append((att.kind.capitalize(), f"{source} -> {att.mountpoint} ({att.mode})"))
    for out in c.outputs:
        fields.append(("Output", f"{out.name} = {out.path}"))
    for port in info.published():
        state = "listening" if port["listening"] else (port.get("error") or "not listening")
        if port.get("hostPath"):
            host = f"unix:{port['hostPath']}"
        else:
            host = (f"[{port['hostIp']}]" if ":" in port["hostIp"] else port["hostIp"]) + f":{port['hostPort']}"
        fields.append(("Publish", f"{host} -> guest 127.0.0.1:{port['guestPort']} ({state}"
                                  + (", dynamic)" if port.get("dynamic") else ")")))
    if s.started_at:
        boot = f" (boot {s.boot_seconds} s{', ' + s.boot_mode if s.boot_mode else ''})" if s.boot_seconds else ""
        fields.append(("Started", s.started_at + boot))
    if s.cold_reason:
        fields.append(("Cold boot", s.cold_reason))
    if s.kernel_release:
        fields.append(("Kernel", s.kernel_release))
    for name, sig in s.readiness.items():
        fields.append((name, readiness_text(sig)))
    if s.error:
        fields.append(("Error", s.error))
    return fields


def fields_text(fields: Sequence[tuple[str, str]]) -> str:
    return "\n".join(f"{label}: {text}" for label, text in fields)


def egress_text(report: dict[str, Any], command: str = "microagent") -> str:
    """``microagent egress NAME``: the policy, then (while it runs) what the guest's DNS and egress proxy did and
    the recent refusals, with the command that would allow them (``command``: ``%microagent`` in a notebook)."""
    lines = [f"Network  {report['networkSummary']}"]
    if not report.get("live"):
        return "\n".join(lines + ["(not running: nothing is counted)"])
    dns, egress = report.get("dns") or {}, report.get("egress") or {}
    lines.append(f"DNS      {dns.get('queries', 0)} queries, {dns.get('forwarded', 0)} forwarded, "
                 f"{dns.get('refusedNames', 0)} names refused (NXDOMAIN), {dns.get('malformed', 0)} malformed")
    if egress:
        lines.append(f"Egress   {egress.get('allowed', 0)} connections allowed, {egress.get('blocked', 0)} refused, "
                     f"{egress.get('secretRequests', 0)} requests with secrets")
        for item in egress.get("recentBlocked") or []:
            target = f"{item.get('name')}:{item.get('port')}"
            lines.append(f"  refused {safe_text(target, 120)}: {safe_text(str(item.get('reason')), 200)}")
        names = sorted({str(i.get("name")) for i in egress.get("recentBlocked") or []
                        if i.get("name") and "allow-list" in str(i.get("reason"))})
        if names:
            lines.append(f"To allow: {command} allow {report['name']} {' '.join(safe_text(n, 120) for n in names)}")
    return "\n".join(lines)
