"""Confine the hypervisor like Firecracker's jailer, and report what was (and was not) applied.

Every VM process is started through ``jail.c`` (a small static launcher, compiled and cached like the guest
agent). As root it gets: its own mount namespace whose root is a tmpfs holding only read-only binds of ``/usr``
and ``/lib*``, the kernel and initramfs, and ``/dev/{null,zero,random,urandom}`` (plus ``/dev/kvm`` under KVM);
new pid, ipc and uts namespaces, and a new net namespace when the workspace has no network (or the one the network
policy hands over); a per-VM uid/gid with no supplementary groups, no capabilities (bounding and ambient sets
emptied), no_new_privs; rlimits; and QEMU's own seccomp filter. Disks, chardevs and QMP reach QEMU as inherited
descriptors, so it opens no host path itself. A non-root user gets the same inside a user namespace that maps only
their own uid (the kernel allows no other uid without a setuid helper).

The per-VM uid is ``JAIL_UID_BASE + supervisor pid``: unique among live VMs without any allocation state, so
RLIMIT_NPROC (counted per uid) bounds one VM, and no VM shares a uid with another or with a host daemon
(``nobody`` is shared). The range starts at 0x70000000, which systemd leaves unused (above the container
ranges, below 2^31), and ends below it plus pid_max (at most 2^22).
"""

from __future__ import annotations

import asyncio
import os
import signal
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..backends import get_backend
from ..backends.base import FdCommand
from ..errors import HostError
from ..guest.initramfs import compile_static
from ..records import WorkspaceDir
from . import cgroups, dns

if TYPE_CHECKING:
    from ..model import LaunchSpec

JAIL_UID_BASE = 0x70000000
CONFINE_ENV = "MICROAGENT_CONFINE"  # "off" runs the hypervisor unconfined (debugging, measurements only)
NOFILE = 4096  # slirp uses a host socket per guest connection; this bounds them
NPROC = 256  # threads of one QEMU: vCPUs, main loop, RCU, I/O, a worker pool of up to 64
NAMESPACES = ("mnt", "pid", "ipc", "uts", "net")
LIB_DIRS = ("/lib", "/lib32", "/lib64", "/libx32", "/bin", "/sbin")
DEVICES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")
HOSTNAME = "microagent-vmm"

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]] | None  # None: leave unserved


class JailError(HostError):
    """The hypervisor could not be confined and started."""


def launcher_binary(state_dir: Path) -> Path:
    """The jail launcher, compiled once per source hash into ``<state-dir>/cache``."""
    src = resources.files(__package__).joinpath("jail.c").read_bytes()
    return compile_static(state_dir, src, "jail")


def userns_support() -> tuple[bool, str]:
    """Whether this (non-root) user may create a user namespace, and why not."""
    checks = (("/proc/sys/user/max_user_namespaces", "0", "user.max_user_namespaces is 0"),
              ("/proc/sys/kernel/unprivileged_userns_clone", "0", "kernel.unprivileged_userns_clone is 0"),
              ("/proc/sys/kernel/apparmor_restrict_unprivileged_userns", "1",
               "AppArmor restricts unprivileged user namespaces"))
    for path, bad, why in checks:
        try:
            if Path(path).read_text().strip() == bad:
                return False, why
        except OSError:
            pass
    return True, "unprivileged user namespaces are allowed"


def host_summary() -> dict[str, Any]:
    """What confinement this host and user allow (for doctor)."""
    root = os.geteuid() == 0
    userns_ok, userns_why = (True, "not needed as root") if root else userns_support()
    cg = cgroups.detect()
    return {"root": root, "userNamespace": {"ok": userns_ok, "detail": userns_why},
            "namespaces": list(NAMESPACES) if (root or userns_ok) else [],
            "uid": "per-VM uid from 0x70000000 + supervisor pid" if root else f"your uid {os.geteuid()} (no other "
                   "uid is possible without root)",
            "cgroup": {"available": cg.available, "detail": cg.reason}}


@dataclass
class JailPlan:
    args: list[str]
    report: dict[str, Any]
    cgroup: Path | None = None


def plan(ws: WorkspaceDir, network: str, accel: str, cmd: FdCommand, supervisor_pid: int,
         join_namespaces: dict[str, str] | None = None) -> JailPlan:
    """The launcher's arguments for this VM, and the confinement report saved in the workspace's state."""
    join = dict(join_namespaces or {})
    root = os.geteuid() == 0
    unavailable: list[dict[str, str]] = []
    args: list[str] = []
    namespaces: dict[str, str] = {}
    userns_ok, userns_why = (True, "") if root else userns_support()
    if "user" in join:
        args += ["--join", "user", join.pop("user")]
        namespaces["user"] = "joined"
    elif not root:
        if userns_ok:
            args += ["--unshare", "user"]
            namespaces["user"] = "new (maps only your uid)"
        else:
            unavailable.append({"what": "user namespace (and with it every other namespace and the private root)",
                                "why": userns_why})
    can_ns = root or userns_ok or "user" in namespaces
    for ns in NAMESPACES:
        if ns in join:
            args += ["--join", ns, join.pop(ns)]
            namespaces[ns] = "joined"
        elif not can_ns:
            namespaces[ns] = "host"
        elif ns == "net" and network != "none":
            namespaces[ns] = "host"
            unavailable.append({"what": "net namespace", "why": "--network user runs QEMU's user-mode networking "
                                "in the host's network namespace until the network policy hands one over"})
        else:
            args += ["--unshare", ns]
            namespaces[ns] = "new"
    for ns, path in join.items():  # any other namespace the caller wants joined
        args += ["--join", ns, path]
        namespaces[ns] = "joined"

    visible: list[str] = []
    if can_ns:
        args += ["--root", str(ws.run_dir / "jail"), "--hostname", HOSTNAME]
        (ws.run_dir / "jail").mkdir(mode=0o700, exist_ok=True)
        binds = [("/usr", "/usr")]
        qemu_dir = str(Path(cmd.argv[0]).resolve().parent)
        if not qemu_dir.startswith("/usr/"):
            binds.append((qemu_dir, qemu_dir))
        for d in LIB_DIRS:
            if os.path.islink(d):
                args += ["--symlink", os.readlink(d), d]
            elif os.path.isdir(d):
                binds.append((d, d))
        if os.path.exists("/etc/ld.so.cache"):
            binds.append(("/etc/ld.so.cache", "/etc/ld.so.cache"))
        if network != "none":  # the guest's DNS: libslirp asks the nameserver named here (see sandbox/dns.py)
            resolv = ws.run_dir / "resolv.conf"
            resolv.write_text(dns.JAIL_RESOLV_CONF)
            resolv.chmod(0o644)  # read by the VM's uid; it holds no secret
            binds.append((str(resolv), "/etc/resolv.conf"))
        for src, dst in cmd.binds_ro:
            if root and not os.stat(src).st_mode & stat.S_IROTH:
                raise JailError(f"{src} is not world-readable, so the VM's unprivileged uid cannot read it; "
                                f"make it readable (chmod 0644 {src}: it holds no secrets)")
            binds.append((src, dst))
        for src, dst in binds:
            args += ["--bind-ro", src, dst]
        for dev in [*DEVICES, *cmd.devices]:
            args += ["--bind-rw", dev, dev]
        for src, dst in cmd.binds_rw:  # a template's RAM file (snapshots.warm gives it to the VM's uid)
            args += ["--bind-rw", src, dst]
        visible = [dst for _, dst in binds] + list(DEVICES) + cmd.devices + [dst for _, dst in cmd.binds_rw]
    else:
        unavailable.append({"what": "private root", "why": "needs a mount namespace"})

    uid, gid = os.geteuid(), os.getegid()
    if root:
        uid = gid = JAIL_UID_BASE + supervisor_pid
        args += ["--uid", str(uid), "--gid", str(gid)]
        if cmd.devices:  # /dev/kvm is usually root:kvm 0660: keep that group
            args += ["--group", str(os.stat("/dev/kvm").st_gid)]

    rlimits: dict[str, int] = {"nofile": NOFILE, "core": 0, "fsize": max(cmd.largest_file, 1 << 20)}
    if root or namespaces.get("user", "").startswith("new"):
        rlimits["nproc"] = NPROC
    else:
        unavailable.append({"what": "RLIMIT_NPROC", "why": f"without a user namespace it would count every "
                            f"process of uid {uid}, not just this VM's"})
    for name, value in rlimits.items():
        args += ["--rlimit", name, str(value)]
    unavailable.append({"what": "RLIMIT_AS", "why": "QEMU reserves address space far beyond its use (TCG's code "
                        "buffer, guest RAM, thread stacks); memory is bounded by a cgroup where there is one"})

    cg = cgroups.detect()
    cg_path = None
    cfg = ws.load_config()
    limits = cgroups.limits_for(cfg.memory_mib, cfg.cpus, accel)
    if cg.available:
        cg_path = cgroups.create(cg, f"{ws.name}-{supervisor_pid}", limits)
        args += ["--cgroup", str(cg_path)]
    else:
        unavailable.append({"what": "cgroup", "why": cg.reason})
    report = {
        "enabled": True,
        "launcher": "jail.c",
        "uid": uid, "gid": gid,
        "capabilities": "none (effective, permitted, inheritable, bounding and ambient sets empty)",
        "noNewPrivs": True,
        "seccomp": " ".join(_sandbox_args(cmd.argv)),
        "namespaces": namespaces,
        "root": {"private": bool(visible), "visible": visible},
        "cgroup": {"available": cg.available, "detail": cg.reason, "path": str(cg_path) if cg_path else None,
                   "limits": limits.to_json() if cg.available else None},
        "rlimits": rlimits,
        "unavailable": unavailable,
    }
    return JailPlan(args, report, cg_path)


def _sandbox_args(argv: list[str]) -> list[str]:
    i = argv.index("-sandbox") if "-sandbox" in argv else -1
    return argv[i:i + 2] if i >= 0 else []


def observed(pid: int) -> dict[str, Any]:
    """What /proc says about the confined process (uid, capabilities, no_new_privs, namespaces)."""
    out: dict[str, Any] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("Uid", "Gid"):
                out[key.lower()] = int(value.split()[0])
            elif key in ("CapEff", "CapBnd", "CapAmb", "NoNewPrivs"):
                out[key[0].lower() + key[1:]] = value.strip()
        out["separateNamespaces"] = [ns for ns in ("user", *NAMESPACES)
                                     if os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}")]
    except OSError:
        pass
    return out


@dataclass
class ConfinedVM:
    """The running hypervisor as the supervisor sees it: ``pid`` is QEMU's pid in the host pid namespace (its
    parent is the launcher, which mirrors its exit); ``kill`` signals QEMU itself, ``wait`` waits for the
    launcher, which exits only after QEMU was reaped (so its disks are closed)."""

    proc: asyncio.subprocess.Process
    pid: int
    cmd: FdCommand
    confinement: dict[str, Any]
    cgroup: Path | None = None
    pidfd: int | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    @property
    def stderr(self) -> asyncio.StreamReader | None:
        return self.proc.stderr

    def kill(self) -> None:
        try:
            if self.pidfd is not None:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            elif self.proc.returncode is None:
                os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    async def wait(self) -> int:
        rc = await self.proc.wait()
        self.cmd.close()
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        if self.cgroup is not None:
            cgroups.remove(self.cgroup)
        return rc


async def spawn_vm(ws: WorkspaceDir, launch: "LaunchSpec", backend_name: str, handlers: dict[str, Handler],
                   stdout: Any, join_namespaces: dict[str, str] | None = None) -> ConfinedVM:
    """Start the VM described by ``launch.argv`` confined; ``handlers`` serve its chardevs by id (each gets the
    supervisor's end of a connected socket pair). Raises JailError with the launcher's reason on failure."""
    backend = get_backend(backend_name)
    cmd = backend.fd_command(launch.argv)
    try:
        if os.environ.get(CONFINE_ENV, "").lower() in ("off", "0", "no"):  # the launcher only waits and reports
            host_path = {dst: src for src, dst in [*cmd.binds_ro, *cmd.binds_rw]}
            if "MICROAGENT_RO_OPEN" in cmd.env:
                cmd.env["MICROAGENT_RO_OPEN"] = host_path[cmd.env["MICROAGENT_RO_OPEN"]]
                cmd.env["LD_PRELOAD"] = host_path[cmd.env["LD_PRELOAD"]]
            cmd.argv = [host_path.get(a, a) for a in cmd.argv if a not in _sandbox_args(cmd.argv)]
            jail = JailPlan([], {"enabled": False, "unavailable": [{"what": "everything",
                                                                    "why": f"{CONFINE_ENV}=off"}]})
        else:
            jail = plan(ws, launch.network, launch.accel, cmd, os.getpid(), join_namespaces)
        rfd, wfd = os.pipe()
        env_args = [a for k, v in cmd.env.items() for a in ("--env", f"{k}={v}")]
        argv = [str(launcher_binary(ws.path.parent.parent)), "--report-fd", str(wfd), *jail.args, *env_args, "--",
                *cmd.argv]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=stdout, stderr=asyncio.subprocess.PIPE,
                pass_fds=[wfd, *cmd.pass_fds], env={"PATH": "/usr/bin:/bin"})
        finally:
            os.close(wfd)
            cmd.close_child_ends()
        reply = await _read_report(rfd)
        if not reply.startswith("pid "):
            await proc.wait()
            why = reply[6:] if reply.startswith("error ") else (reply or "the launcher exited without a word")
            raise JailError(f"could not confine the hypervisor: {why}")
        pid = int(reply.split()[1])
        try:
            pidfd: int | None = os.pidfd_open(pid)
        except OSError:
            pidfd = None
        vm = ConfinedVM(proc, pid, cmd, jail.report, jail.cgroup, pidfd)
        if jail.report.get("enabled"):
            jail.report["observed"] = observed(pid)
        for cid, sock in list(cmd.chardevs.items()):
            handler = handlers.get(cid)
            if handler is None:
                continue
            reader, writer = await asyncio.open_unix_connection(sock=sock)
            del cmd.chardevs[cid]  # the stream owns it now
            vm.tasks.append(asyncio.ensure_future(handler(reader, writer)))
        return vm
    except BaseException:
        cmd.close()
        raise


async def _read_report(fd: int) -> str:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                                os.fdopen(fd, "rb", buffering=0))
    try:
        return (await reader.readline()).decode(errors="replace").strip()
    finally:
        transport.close()
