"""The one argparse group of a workspace request, shared by the ``microagent`` CLI and the ``%microagent`` magics.

:func:`add_workspace_arguments` adds the flags (every surface, or a subset of them); :func:`spec_from_args`
turns the parsed flags into a :class:`~.workspace_spec.WorkspaceSpec`, on top of a ``microagent.yaml`` when one is
given (``-f``) or found, with the merge rules of :meth:`WorkspaceSpec.merged`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Iterable

from .config import ACCEL_CHOICES, NETWORK_CHOICES, PROFILES, RESTART_POLICIES, parse_env_pairs
from .errors import InvalidArgument, SpecError
from .model import parse_attachment_flags, parse_mediation_flag, parse_output_flag, parse_publish_flag
from .network_policy import ALLOW_SYNTAX, NetworkPolicy
from .secret import FLAG_SYNTAX, parse_secret_flag
from .workspace_spec import WorkspaceSpec

#: the flag groups :func:`add_workspace_arguments` knows, in help order
SPEC_NAMES = ("microagent.yaml", "microagent.yml")  # what a directory's spec file may be called
GROUPS = ("image", "resources", "env", "network", "storage", "boot", "publish", "spec")


def add_workspace_arguments(parser: argparse.ArgumentParser, *, only: Iterable[str] = GROUPS,
                            network_default: str = "user") -> None:
    """Add the workspace flags of the groups ``only`` to ``parser`` (every default None: not given)."""
    want = set(only)
    g = parser.add_argument_group("workspace")
    add = g.add_argument
    if "image" in want:
        add("--image", help="image reference (default: the built-in busybox image; builtin:python for Python "
            "with numpy, pandas, matplotlib, ipykernel)")
        add("--packages", metavar="'PKG ...'", help="Debian packages to add to --image builtin:python (space- or "
            "comma-separated)")
    if "resources" in want:
        add("--profile", choices=list(PROFILES), help="resource profile (default small)")
        add("--memory", type=int, metavar="MIB", help="memory in MiB (overrides the profile)")
        add("--cpus", type=int, help="vCPUs (overrides the profile)")
        add("--size-mib", type=int, metavar="MIB", help="rootfs size in MiB (overrides the profile)")
    if "env" in want:
        add("-e", "--env", action="append", metavar="KEY=VALUE", help="guest environment variable")
        add("--hostname", help="guest hostname (default: the name as a hostname)")
    if "network" in want:
        other = "isolated" if network_default == "user" else "user"
        what = {"user": "user (NAT to the public internet only)", "isolated": "isolated (no network device)"}
        add("--network", choices=list(NETWORK_CHOICES),
            help=f"{what[network_default]}, the default here, or {what[other]}")
        add("--allow", action="append", metavar=ALLOW_SYNTAX, help="narrow egress to these destinations "
            "(repeatable): addresses, or names (exact, *.suffix, presets) that the guest's DNS then answers and the "
            "egress proxy admits by TLS SNI or HTTP Host, on their port")
        add("--allow-host-port", action="append", type=int, metavar="PORT", help="let the guest reach this "
            "host's 127.0.0.1:PORT at 10.0.2.2:PORT (repeatable)")
        add("--secret", action="append", metavar=FLAG_SYNTAX, help="give code a secret without giving it the "
            "value: the guest's $NAME is a placeholder that the egress proxy replaces in HTTPS request headers to "
            "these hosts only (value from $NAME, $VAR or a file, read at each start; repeatable)")
    if "storage" in want:
        add("-v", "--volume", action="append", metavar="SRC:DST[:ro|rw]", help="named volume, .tar/.tar.gz/.tgz "
            "bundle or .ext4/.img disk (host directories are rejected)")
        add("--disk", action="append", metavar="NAME=/path.ext4:/mount[:ro|rw]", help="attach an existing ext4 "
            "image (default rw)")
        add("--bundle", action="append", metavar="NAME=/path.tar:/mount[:ro|rw]", help="build a one-shot ext4 "
            "disk from a tar archive (default ro)")
        add("--output", action="append", metavar="NAME=/guest/path", help="declared output artifact")
    if "boot" in want:
        add("--accel", choices=list(ACCEL_CHOICES), help="accelerator (default auto; $MICROAGENT_ACCEL)")
        add("--kernel", help="guest kernel (vmlinux or bzImage; default: Debian's cloud kernel, "
            "$MICROAGENT_KERNEL)")
        add("--setup", action="append", metavar="CMD", help="shell command run once before first start")
        add("--entrypoint", metavar="CMD", help="command run when the workspace starts")
        add("--restart", choices=list(RESTART_POLICIES), help="restart policy")
        add("--shell", help="console shell (default /bin/sh)")
        add("--cold", action="store_const", const=True, help="boot cold, never from the machine shape's template")
    if "publish" in want:
        add("-p", "--publish", action="append", metavar="[HOST_IP:]HOST_PORT:GUEST_PORT", help="forward a host "
            "TCP port to the guest's 127.0.0.1:GUEST_PORT over the agent channel (works with --network isolated; "
            "HOST_IP default 127.0.0.1; HOST_PORT 0 = any free port). A port on 127.0.0.1 is open to every local "
            "user of this host, not only you")
        add("--mediation", metavar="PORT=HOST:PORT", help="bridge guest 127.0.0.1:PORT to a host TCP service "
            "(required, fail-closed)")
    if "spec" in want:
        add("-f", "--file", metavar="SPEC", help="workspace spec (default: ./microagent.yaml or ./microagent.yml); "
            "flags override its fields")
        add("--allow-host-files", action="store_true", default=None, help="let the spec copy or attach host files "
            "outside its own directory (only for a spec you trust)")


def _get(args: argparse.Namespace, attr: str) -> Any:
    return getattr(args, attr, None)


def flags_spec(args: argparse.Namespace, network_base: NetworkPolicy | None = None) -> WorkspaceSpec:
    """The request of the flags given in ``args`` alone. ``--network``/``--allow``/``--allow-host-port`` merge key
    by key over ``network_base`` (a spec file's ``network:``)."""
    network = NetworkPolicy.from_flags(_get(args, "network"), _get(args, "allow"), _get(args, "allow_host_port"))
    if network is not None and network_base is not None:
        network = {**network_base.to_json(), **network}
    attachments = parse_attachment_flags(_get(args, "volume") or [], _get(args, "disk") or [],
                                         _get(args, "bundle") or [])
    mediation = _get(args, "mediation")
    return WorkspaceSpec(
        image=_get(args, "image"), packages=[args.packages] if _get(args, "packages") else None,
        profile=_get(args, "profile"), memory_mib=_get(args, "memory"), cpus=_get(args, "cpus"),
        size_mib=_get(args, "size_mib"), env=parse_env_pairs(_get(args, "env")) or None,
        hostname=_get(args, "hostname"), network=network, accel=_get(args, "accel"), kernel=_get(args, "kernel"),
        restart=_get(args, "restart"), shell=_get(args, "shell"), setup=_get(args, "setup"),
        entrypoint=_get(args, "entrypoint"), mediation=parse_mediation_flag(mediation) if mediation else None,
        attachments=attachments or None, outputs=[parse_output_flag(o) for o in _get(args, "output") or []] or None,
        publish=[parse_publish_flag(p) for p in _get(args, "publish") or []] or None, cold=_get(args, "cold"),
        secrets=[parse_secret_flag(s) for s in _get(args, "secret") or []] or None,
        from_snapshot=_get(args, "from_snapshot"))


def find_default_spec(cwd: Path) -> Path | None:
    """``microagent.yaml`` or ``microagent.yml`` in ``cwd``, or None. Both present is an error."""
    found = [cwd / n for n in SPEC_NAMES if (cwd / n).exists()]
    if len(found) > 1:
        raise SpecError(f"both {SPEC_NAMES[0]} and {SPEC_NAMES[1]} exist; keep one (delete or rename the other) "
                        f"or choose with --file", file=cwd)
    return found[0] if found else None


def spec_from_args(args: argparse.Namespace, *, find_spec: bool = True,
                   cwd: Path | None = None) -> tuple[WorkspaceSpec, str | None]:
    """The request of ``args``: its ``-f`` spec file (or, with ``find_spec``, ./microagent.yaml when present)
    under the flags given; and the name the spec file gives (None if none)."""
    path = _get(args, "file")
    if _get(args, "from_snapshot"):  # the snapshot's workspace as it was: no spec file
        if path:
            raise InvalidArgument("--from-snapshot takes the workspace as it was snapshotted; drop --file")
        return flags_spec(args), None
    found = Path(path).expanduser() if path else (find_default_spec(cwd or Path.cwd()) if find_spec else None)
    if found is None:
        return flags_spec(args), None
    from .spec import load_spec  # yaml and the spec's grammar (~25 ms): only when there is a spec to read

    doc = load_spec(found, allow_host_files=bool(_get(args, "allow_host_files")))
    base = doc.workspace_spec()
    return base.merged(flags_spec(args, base.network)), doc.name


def workspace_name(positional: str | None, option: str | None, spec_name: str | None = None) -> str | None:
    """The name of ``create NAME``/``--name NAME`` (or else the spec file's); both given and different is an
    error."""
    if positional and option and positional != option:
        raise InvalidArgument(f"two names given ({positional!r} and --name {option!r}); give one")
    return positional or option or spec_name
