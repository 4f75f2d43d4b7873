#!/usr/bin/env python3
"""Egress benchmark: a download through the egress proxy (a name on the allow-list) against the same download
over a direct connection (an address on the allow-list, no proxy), from one running workspace, in one run.

A network namespace of the bench's own (root; a veth pair, nothing leaves this host) holds an HTTP server with one
in-memory body on two ports of a stand-in public address and a DNS stand-in for "bulk.test". The workspace allows
``bulk.test:80`` (by name: DNS, proxy) and ``ADDRESS:8080`` (by address: nftables only); the guest downloads the
body with busybox nc into /dev/null, alternating the two paths. Prints min/median per path and the ratio.

    python bench/bench_egress.py [--mib 100] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from microagent_engine import Engine, WorkspaceSpec  # noqa: E402
from microagent_engine.config import RESOLV_CONF_ENV  # noqa: E402

_SERVER = r"""
import http.server, socket, struct, sys, threading
dns_addr, public, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
body = b"x" * size
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        view = memoryview(body)
        for i in range(0, len(body), 1 << 20):
            self.wfile.write(view[i:i + (1 << 20)])
    def log_message(self, *a): pass
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((dns_addr, 53))
    while True:
        q, a = s.recvfrom(512)
        pos = 12
        while q[pos]: pos += q[pos] + 1
        qtype = struct.unpack_from("!H", q, pos + 1)[0]; question = q[12:pos + 5]
        rr = b"\xc0\x0c" + struct.pack("!2HIH", 1, 1, 60, 4) + socket.inet_aton(public) if qtype == 1 else b""
        s.sendto(q[:2] + struct.pack("!5H", 0x8180, 1, 1 if rr else 0, 0, 0) + question + rr, a)
threading.Thread(target=udp, daemon=True).start()
for port in (80, 8080):
    srv = http.server.ThreadingHTTPServer((public, port), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_egress: run as root (it creates a network namespace and a veth pair)", file=sys.stderr)
        return 2
    tag = secrets.token_hex(3)
    ns, host_if, ns_if = f"ma-bench-{tag}", f"mbh{tag}", f"mbn{tag}"
    n = secrets.randbelow(250) + 1
    resolver, public = f"10.201.{n}.2", f"45.{secrets.randbelow(200) + 20}.{secrets.randbelow(256)}.9"
    state = Path(tempfile.mkdtemp(prefix="ma-bench-egress-"))
    conf = state / "resolv.conf"
    conf.write_text(f"nameserver {resolver}\n")
    os.environ[RESOLV_CONF_ENV] = str(conf)
    proc = None
    ip("netns", "add", ns)
    try:
        ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", ns)
        ip("addr", "add", f"10.201.{n}.1/30", "dev", host_if)
        ip("link", "set", host_if, "up")
        ip("-n", ns, "addr", "add", f"{resolver}/30", "dev", ns_if)
        ip("-n", ns, "addr", "add", f"{public}/32", "dev", ns_if)
        ip("-n", ns, "link", "set", ns_if, "up")
        ip("route", "add", f"{public}/32", "via", resolver, "dev", host_if)
        assert json.loads(ip("-j", "route", "get", public))[0]["dev"] == host_if
        proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", _SERVER, resolver, public,
                                 str(args.mib << 20)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        engine = Engine(state)
        spec = WorkspaceSpec(profile="small", network={"mode": "user", "allow": ["bulk.test:80", f"{public}:8080"]})
        engine.create("bench-egress", spec)
        engine.start("bench-egress")
        fetch = ('printf "GET / HTTP/1.0\\r\\nHost: $0\\r\\n\\r\\n" | nc -w 30 "$1" "$2" | wc -c')
        # resolve once through the workspace's DNS (the proxy admits only addresses it handed out)
        engine.exec("bench-egress", ["nslookup", "bulk.test"], timeout=60)
        times: dict[str, list[float]] = {"direct (address, nftables)": [], "egress proxy (name)": []}
        for _ in range(args.rounds):
            for label, port in (("direct (address, nftables)", 8080), ("egress proxy (name)", 80)):
                r = engine.exec("bench-egress", ["sh", "-c", fetch, "bulk.test", public, str(port)], timeout=600)
                got = int(r.stdout.strip() or 0)
                if got < args.mib << 20:
                    print(f"{label}: only {got} bytes arrived ({r.stderr.decode(errors='replace')[-300:]})")
                    return 1
                times[label].append(r.duration)
        print(f"{args.mib} MiB download, {args.rounds} rounds each, one workspace (profile small):")
        for label, values in times.items():
            print(f"  {label:<28} min={min(values):.2f}s median={statistics.median(values):.2f}s "
                  f"({args.mib / statistics.median(values):.0f} MiB/s)")
        proxy, direct = (statistics.median(times[k]) for k in ("egress proxy (name)", "direct (address, nftables)"))
        ratio = proxy / direct
        print(f"  ratio proxy/direct (median): {ratio:.2f}x")
        engine.kill("bench-egress")
        engine.delete("bench-egress")
        return 0
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        subprocess.run(["ip", "link", "del", host_if], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        subprocess.run(["rm", "-rf", str(state)], check=False)


if __name__ == "__main__":
    sys.exit(main())
