"""OCI images: references, a real registry on 127.0.0.1 (Debian's docker-registry, images pushed by the tests),
token auth, layer semantics read back from the built ext4 with debugfs, the cache, and local sources."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Iterator

import pytest
from registry_fixture import (
    DIR_MTIME,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    LAYER_GZIP,
    LAYER_TAR,
    MTIME,
    OCI_INDEX,
    OCI_MANIFEST,
    FlakyFront,
    Image,
    Registry,
    TokenFront,
    d,
    entry,
    f,
    gz,
    sample_image,
    sha,
    tar_bytes,
    write_docker_archive,
    write_oci_layout,
)

from microagent_engine.errors import HostError, InvalidArgument, NotFound
from microagent_engine.hostinfo import require_tool
from microagent_engine.images import reference
from microagent_engine.images.layers import LayerApplier
from microagent_engine.errors import AuthError, ImageError
from microagent_engine.images.store import ImageStore

REPO = "test/base"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    for tool in ("mkfs.ext4", "debugfs", "zstd"):
        require_tool(tool)
    if not os.path.exists("/usr/bin/docker-registry"):
        pytest.fail("docker-registry is missing; install it: apt-get install -y docker-registry", pytrace=False)
    reg = Registry(tmp_path_factory.mktemp("registry")).start()
    reg.image = sample_image()  # type: ignore[attr-defined]
    reg.digest = reg.push_image(REPO, "v1", reg.image)  # type: ignore[attr-defined]
    yield reg
    reg.stop()


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "state")


def debugfs(img: Path, cmd: str) -> str:
    proc = subprocess.run([require_tool("debugfs"), "-R", cmd, str(img)], capture_output=True, text=True)
    err = "".join(ln for ln in proc.stderr.splitlines(True) if not ln.startswith("debugfs "))
    return proc.stdout + err


def ls(img: Path, path: str) -> set[str]:
    out = debugfs(img, f"ls -p {path}")
    return {line.split("/")[5] for line in out.splitlines() if line.startswith("/")} - {".", ".."}


def stat_of(img: Path, path: str) -> dict[str, str]:
    out = debugfs(img, f'stat "{path}"')
    assert "File not found" not in out, out
    info = dict(re.findall(r"(Mode|User|Group|Type|Links|Inode):\s+(\S+)", out))
    m = re.search(r"Device major/minor number: (\d+):(\d+)", out)
    if m:
        info["dev"] = f"{int(m.group(1))}:{int(m.group(2))}"
    m = re.search(r"mtime: 0x([0-9a-f]+)", out)
    if m:
        info["mtime"] = str(int(m.group(1), 16))
    m = re.search(r'Fast link dest: "([^"]*)"', out)
    if m:
        info["link"] = m.group(1)
    return info


# --- references ------------------------------------------------------------------------------------------------

def test_parse_references(monkeypatch: pytest.MonkeyPatch) -> None:
    hub = reference.DOCKER_DOMAIN
    r = reference.parse("python:3.12")
    assert (str(r), r.tag) == (f"{hub}/library/python:3.12", "3.12")
    monkeypatch.delenv(reference.DOCKER_IO_ENV, raising=False)
    assert (r.registry, r.scheme) == ("registry-1.docker.io", "https")  # Docker Hub's endpoint by default
    monkeypatch.setenv(reference.DOCKER_IO_ENV, "127.0.0.1:5999")
    assert (r.registry, r.scheme) == ("127.0.0.1:5999", "http")
    assert str(reference.parse("alpine")) == f"{hub}/library/alpine:latest"
    digest = "sha256:" + "ab" * 32
    r = reference.parse(f"localhost:5000/team/app@{digest}")
    assert (r.registry, r.repository, r.tag, r.reference, r.scheme) == (
        "localhost:5000", "team/app", None, digest, "http")
    r = reference.parse(f"127.0.0.1:5000/app:v2@{digest}")
    assert (r.tag, r.digest, r.base_url) == ("v2", digest, "http://127.0.0.1:5000/v2/app")
    assert reference.parse("10.0.0.1:8443/x").scheme == "https"
    monkeypatch.setenv(reference.INSECURE_ENV, "10.0.0.1:8443, other:1")
    assert reference.parse("10.0.0.1:8443/x").scheme == "http"
    for bad in ("", "UPPER/case", "x@sha256:12", "a:b:c", "http://127.0.0.1/x", "x:bad tag"):
        with pytest.raises(InvalidArgument):
            reference.parse(bad)


# --- pulls -----------------------------------------------------------------------------------------------------

# as root both paths run (root sets owners in staging; the other records them and replays with debugfs)
@pytest.mark.parametrize("privileged", [True, False] if os.geteuid() == 0 else [False],
                         ids=["root-staging", "debugfs-replay"] if os.geteuid() == 0 else ["debugfs-replay"])
def test_pull_builds_faithful_rootfs(registry: Registry, tmp_path: Path, privileged: bool) -> None:
    msgs: list[str] = []
    store = ImageStore(tmp_path / "state", progress=msgs.append, privileged=privileged)
    info = store.ensure(f"{registry.host}/{REPO}:v1")
    img = info.path
    assert img.parent == tmp_path / "state" / "images" and img.suffix == ".ext4"
    assert info.id == registry.digest  # type: ignore[attr-defined]
    assert info.config["Env"] == ["PATH=/usr/bin:/bin", "GREETING=hello"] and info.env["GREETING"] == "hello"
    assert info.config["Cmd"] == ["/bin/sh"] and info.platform == "linux/amd64"
    assert any(m.startswith("Pulling ") for m in msgs)
    subprocess.run([require_tool("e2fsck"), "-fn", str(img)], check=True, capture_output=True)

    # whiteouts: plain, opaque (same-layer sibling survives), untouched neighbours stay
    assert "removeme" not in ls(img, "/etc") and "hosts" in ls(img, "/etc")
    assert ls(img, "/opt/old") == {"new"}
    assert ls(img, "/opt/keep") == {"x"}
    assert debugfs(img, "cat /etc/os-release").strip().endswith("ID=testupper")
    # a write through the lib -> usr/lib symlink lands inside the root
    assert "libfoo.so" in ls(img, "/usr/lib") and stat_of(img, "/lib")["Type"] == "symlink"
    # owners, modes, setuid/setgid, sticky
    assert stat_of(img, "/usr/bin/su-test")["Mode"] == "04755"
    sg = stat_of(img, "/usr/bin/sg-test")
    assert (sg["Mode"], sg["Group"]) == ("02755", "50")
    home = stat_of(img, "/home/user/file")
    assert (home["User"], home["Group"], home["Mode"]) == ("1000", "1000", "0640")
    assert stat_of(img, "/home/user")["User"] == "1000" and stat_of(img, "/home/user")["Mode"] == "0750"
    assert stat_of(img, "/tmp")["Mode"] == "01777" and stat_of(img, "/root")["Mode"] == "0700"
    assert stat_of(img, "/etc/secret")["Mode"] == "0000"
    assert stat_of(img, "/locked")["Mode"] == "0555" and ls(img, "/locked") == {"inside", "added"}
    assert stat_of(img, "/bin/busybox")["Mode"] == "0755"
    # symlinks, hardlinks, devices, fifo, xattrs, directory mtimes
    assert stat_of(img, "/bin/sh")["link"] == "busybox" and stat_of(img, "/bin/ls")["link"] == "/bin/busybox"
    hosts, hard = stat_of(img, "/etc/hosts"), stat_of(img, "/etc/hosts.hard")
    assert hosts["Inode"] == hard["Inode"] and hosts["Links"] == "2"
    null = stat_of(img, "/dev/null")
    assert (null["Type"], null["dev"], null["Mode"]) == ("character", "1:3", "0666")
    loop = stat_of(img, "/dev/loop0")
    assert (loop["Type"], loop["dev"], loop["Mode"], loop["Group"]) == ("block", "7:0", "0660", "6")
    assert stat_of(img, "/dev/fifo")["Type"] == "FIFO"
    assert "hello" in debugfs(img, "ea_get /etc/xattr-file user.test")
    assert "security.capability (20) = 01 00 00 02 00 04 00 00" in debugfs(img, "ea_list /usr/bin/cap-test")
    assert stat_of(img, "/etc")["mtime"] == str(DIR_MTIME) and stat_of(img, "/")["mtime"] == str(MTIME)
    assert (tmp_path / "state" / "blobs" / "sha256").is_dir()


def test_pull_by_digest_and_cache(registry: Registry, store: ImageStore) -> None:
    by_tag = store.ensure(f"{registry.host}/{REPO}:v1")
    by_digest = store.ensure(f"{registry.host}/{REPO}@{registry.digest}")  # type: ignore[attr-defined]
    assert by_digest.path == by_tag.path and by_digest.id == registry.digest  # type: ignore[attr-defined]
    assert len(store.list()) == 1 and len(store.list()[0].refs) == 2
    blobs = store.blobs.digests()
    assert len(blobs) == 3  # config + 2 layers
    assert not list((store.state_dir / "blobs" / "sha256").glob(".*"))


def test_multi_platform_index(registry: Registry, tmp_path: Path) -> None:
    amd = sample_image("amd64")
    arm = Image(amd.layers, arch="arm64", diff_ids=amd.diff_ids)
    amd_d = registry.push_image("test/multi", None, amd)
    arm_d = registry.push_image("test/multi", None, arm)
    att_cfg, att_layer = b"{}", b'{"predicateType": "x"}'
    registry.push_blob("test/multi", att_cfg)
    registry.push_blob("test/multi", att_layer)
    att = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(att_cfg), "size": 2},
           "layers": [{"mediaType": "application/vnd.in-toto+json", "digest": sha(att_layer),
                       "size": len(att_layer)}]}
    att_d = registry.push_manifest("test/multi", sha(json.dumps(att, sort_keys=True).encode()), att)

    def desc(digest: str, doc: dict[str, object], arch: str) -> dict[str, object]:
        return {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(json.dumps(doc, sort_keys=True).encode()),
                "platform": {"os": "unknown" if arch == "unknown" else "linux", "architecture": arch}}

    # the attestation comes first: it must be skipped, not chosen
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        desc(att_d, att, "unknown"), desc(arm_d, arm.manifest(), "arm64"), desc(amd_d, amd.manifest(), "amd64")]}
    registry.push_manifest("test/multi", "latest", index)
    info = ImageStore(tmp_path / "a").ensure(f"{registry.host}/test/multi")
    assert (info.id, info.platform) == (amd_d, "linux/amd64")
    info = ImageStore(tmp_path / "b", platform="linux/arm64").ensure(f"{registry.host}/test/multi:latest")
    assert (info.id, info.platform) == (arm_d, "linux/arm64")
    with pytest.raises(NotFound, match=r"no image for platform linux/s390x \(it has: linux/arm64, linux/amd64\)"):
        ImageStore(tmp_path / "c", platform="linux/s390x").ensure(f"{registry.host}/test/multi")


def test_docker_schema2_manifest_list(registry: Registry, tmp_path: Path) -> None:
    layer = gz(tar_bytes([d("etc"), f("etc/os-release", b"ID=dockerfmt\n")]))
    images = {arch: Image([(LAYER_GZIP, layer)], arch=arch, docker=True) for arch in ("arm64", "amd64")}
    digests = {arch: registry.push_image("test/dockerfmt", None, img) for arch, img in images.items()}
    manifests = [{"mediaType": DOCKER_MANIFEST, "digest": digests[a],
                  "size": len(json.dumps(images[a].manifest(), sort_keys=True).encode()),
                  "platform": {"os": "linux", "architecture": a}} for a in ("arm64", "amd64")]
    registry.push_manifest("test/dockerfmt", "v1", {"schemaVersion": 2, "mediaType": DOCKER_LIST,
                                                     "manifests": manifests})
    info = ImageStore(tmp_path / "s").ensure(f"{registry.host}/test/dockerfmt:v1")
    assert info.id == digests["amd64"] and info.platform == "linux/amd64"
    assert debugfs(info.path, "cat /etc/os-release").strip() == "ID=dockerfmt"


def test_errors_name_the_problem(registry: Registry, store: ImageStore) -> None:
    with pytest.raises(NotFound, match=rf"{registry.host}/{REPO}:nope.*not found"):
        store.ensure_rootfs(f"{registry.host}/{REPO}:nope")
    with pytest.raises(NotFound, match="test/missing"):
        store.ensure_rootfs(f"{registry.host}/test/missing:v1")
    from registry_fixture import free_port
    dead = f"127.0.0.1:{free_port()}"
    with pytest.raises(HostError, match=f"cannot reach registry {dead}"):
        store.ensure_rootfs(f"{dead}/x:v1")
    assert store.list() == []


def test_corrupt_blob_refused_and_not_cached(registry: Registry, store: ImageStore) -> None:
    layer = gz(tar_bytes([f("hello", b"hello world\n" * 100)]))
    img = Image([(LAYER_GZIP, layer)])
    registry.push_image("test/corrupt", "v1", img)
    blob = registry.blob_file(sha(layer))
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other content
    blob.write_bytes(bytes(data))
    with pytest.raises(ImageError, match=rf"blob {sha(layer)} is corrupt"):
        store.ensure_rootfs(f"{registry.host}/test/corrupt:v1")
    assert not store.blobs.has(sha(layer))
    assert not [p for p in (store.state_dir / "blobs" / "sha256").iterdir() if p.name.startswith(".")]
    assert store.list() == []


def test_non_tar_layer_refused(registry: Registry, store: ImageStore) -> None:
    junk = os.urandom(4096)
    registry.push_image("test/junk", "v1", Image([(LAYER_TAR, junk)]))
    with pytest.raises(ImageError, match="not a valid tar archive"):
        store.ensure_rootfs(f"{registry.host}/test/junk:v1")
    truncated = gz(tar_bytes([f("big", os.urandom(100_000))]))[:20_000]
    registry.push_image("test/junk", "v2", Image([(LAYER_GZIP, truncated)]))
    with pytest.raises(ImageError, match="not a valid tar archive"):
        store.ensure_rootfs(f"{registry.host}/test/junk:v2")
    assert store.list() == [] and not list(store.dir.glob(".build-*"))


def test_resume_partial_download(registry: Registry, store: ImageStore, monkeypatch: pytest.MonkeyPatch) -> None:
    from microagent_engine.images.registry import RegistryClient
    layer_digest, layer = sha(registry.image.layers[0][1]), registry.image.layers[0][1]  # type: ignore[attr-defined]
    partial = store.blobs.path(layer_digest).with_name(f".{layer_digest[7:]}.partial")
    partial.parent.mkdir(parents=True)
    partial.write_bytes(layer[: len(layer) // 2])
    seen: list[tuple[str, int]] = []
    real_open = RegistryClient._open

    def spy(self: RegistryClient, ref: object, url: str, headers: dict[str, str], what: str) -> object:
        resp = real_open(self, ref, url, headers, what)  # type: ignore[arg-type]
        seen.append((headers.get("Range", ""), resp.status))
        return resp

    monkeypatch.setattr(RegistryClient, "_open", spy)
    store.ensure_rootfs(f"{registry.host}/{REPO}:v1")
    assert (f"bytes={len(layer) // 2}-", 206) in seen
    assert store.blobs.path(layer_digest).read_bytes() == layer and not partial.exists()


def test_dropped_connection_resumes(registry: Registry, store: ImageStore) -> None:
    front = FlakyFront(registry.host).start()
    try:
        info = store.ensure(f"{front.host}/{REPO}:v1")
    finally:
        front.stop()
    assert info.id == registry.digest  # type: ignore[attr-defined]
    assert front.cut and len(front.ranges) == len(front.cut)  # each big blob was cut once, then resumed with Range
    assert not [p for p in (store.state_dir / "blobs" / "sha256").iterdir() if p.name.startswith(".")]


def test_cache_hit_without_network(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg").start()
    try:
        reg.push_image("test/offline", "v1", Image([(LAYER_GZIP, gz(tar_bytes([f("a", b"a\n")])))]))
        store = ImageStore(tmp_path / "state")
        first = store.ensure_rootfs(f"{reg.host}/test/offline:v1")
    finally:
        reg.stop()
    mtime = first.stat().st_mtime_ns
    assert store.ensure_rootfs(f"{reg.host}/test/offline:v1") == first
    assert first.stat().st_mtime_ns == mtime
    with pytest.raises(HostError, match=f"cannot reach registry {reg.host}"):
        store.ensure_rootfs(f"{reg.host}/test/offline:v1", refresh=True)


def test_token_auth_and_redirects(registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    front = TokenFront(registry.host).start()
    try:
        ref = f"{front.host}/{REPO}:v1"
        auth_file = tmp_path / "auth.json"
        monkeypatch.setenv("MICROAGENT_AUTH_FILE", str(auth_file))
        with pytest.raises(AuthError, match=rf"no credentials for {front.host} in {auth_file}"):
            ImageStore(tmp_path / "s0").ensure(ref)
        import base64
        auth_file.write_text(json.dumps({"auths": {front.host: {"auth": base64.b64encode(b"alice:wrong").decode()}}}))
        with pytest.raises(AuthError, match=rf"credentials for {front.host} in {auth_file} were rejected"):
            ImageStore(tmp_path / "s1").ensure(ref)
        auth_file.write_text(json.dumps({"auths": {f"http://{front.host}/v1/": {
            "auth": base64.b64encode(b"alice:s3cret").decode()}}}))
        info = ImageStore(tmp_path / "s2").ensure(ref)
        assert info.id == registry.digest  # type: ignore[attr-defined]
        token_hits = [p for p, _ in front.requests if p.startswith("/token")]
        assert token_hits and "scope=repository%3Atest%2Fbase%3Apull" in token_hits[-1]
        assert any("/blobs/" in p for p, a in front.requests if a.startswith("Bearer "))  # answered with 307
    finally:
        front.stop()


_CHILD = """
import sys
from microagent_engine.images.store import ImageStore
print(ImageStore(sys.argv[1]).ensure_rootfs(sys.argv[2]))
"""


def test_concurrent_pulls_share_the_cache(registry: Registry, tmp_path: Path) -> None:
    state, ref = tmp_path / "state", f"{registry.host}/{REPO}:v1"
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(state), ref], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert outs[0][0] == outs[1][0]
    files = list((state / "blobs" / "sha256").iterdir())
    assert len(files) == 3 and not [p for p in files if p.name.startswith(".")]
    assert len(list((state / "images").glob("oci-*.ext4"))) == 1


# --- local sources ----------------------------------------------------------------------------------------------

def test_oci_layout_and_archive(tmp_path: Path, store: ImageStore) -> None:
    image = sample_image()
    layout = tmp_path / "layout"
    digest = write_oci_layout(layout, image, tag="v1")
    info = store.ensure(f"oci:{layout}:v1")
    assert info.id == digest and stat_of(info.path, "/usr/bin/su-test")["Mode"] == "04755"
    assert store.ensure(str(layout)).path == info.path  # bare path, single image
    archive = tmp_path / "img.tar"
    with tarfile.open(archive, "w") as tf:
        for p in sorted(layout.rglob("*")):
            tf.add(p, arcname=str(p.relative_to(layout)), recursive=False)
    assert store.ensure(f"oci-archive:{archive}").id == digest
    assert store.ensure(str(archive)).id == digest
    with pytest.raises(NotFound, match="no image tagged 'v2'"):
        store.ensure(f"oci:{layout}:v2")
    # a damaged blob in the layout is refused
    layer_file = layout / "blobs" / "sha256" / sha(image.layers[1][1])[7:]
    layer_file.write_bytes(layer_file.read_bytes()[:-1] + b"\0")
    with pytest.raises(ImageError, match="is corrupt"):
        ImageStore(tmp_path / "other").ensure(f"oci:{layout}")


def test_docker_archive(tmp_path: Path, store: ImageStore) -> None:
    archive = tmp_path / "saved.tar"
    write_docker_archive(archive, sample_image(), "test/img:v1")
    info = store.ensure(f"docker-archive:{archive}")
    img = info.path
    assert ls(img, "/opt/old") == {"new"} and "removeme" not in ls(img, "/etc")
    assert stat_of(img, "/home/user/file")["User"] == "1000"
    assert info.config["WorkingDir"] == "/root"
    assert store.ensure(f"docker-archive:{archive}:test/img:v1").id == info.id
    assert store.ensure(str(archive)).id == info.id  # detected by manifest.json
    with pytest.raises(NotFound, match="test/img:v9"):
        store.ensure(f"docker-archive:{archive}:test/img:v9")
    with pytest.raises(NotFound, match="does not exist"):
        store.ensure(f"docker-archive:{tmp_path}/nope.tar")


def test_list_remove_prune(registry: Registry, tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "state")
    a = store.ensure(f"{registry.host}/{REPO}:v1")
    layout = tmp_path / "layout"
    write_oci_layout(layout, Image([(LAYER_GZIP, gz(tar_bytes([f("only", b"1\n")])))]))
    b = store.ensure(f"oci:{layout}")
    assert {i.id for i in store.list()} == {a.id, b.id}
    removed = store.prune({f"{registry.host}/{REPO}:v1"})
    assert [i.id for i in removed] == [b.id] and not b.path.exists()
    assert len(store.blobs.digests()) == 3
    assert store.remove(f"{registry.host}/{REPO}:v1").id == a.id
    assert store.list() == [] and store.blobs.digests() == [] and not a.path.exists()
    with pytest.raises(NotFound, match="not in the local image cache"):
        store.remove(f"{registry.host}/{REPO}:v1")


# --- layer safety -----------------------------------------------------------------------------------------------

def _apply(root: Path, layer: bytes) -> None:
    import io
    LayerApplier(root).apply(io.BytesIO(layer), "test layer")


def test_layer_paths_stay_inside_root(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    with pytest.raises(ImageError, match="escapes the root"):
        _apply(root, tar_bytes([f("../evil", b"x")]))
    _apply(root, tar_bytes([
        entry("up", tarfile.SYMTYPE, 0o777, linkname="../../outside"),
        entry("abs", tarfile.SYMTYPE, 0o777, linkname=str(outside)),
        f("up/pwned", b"x"), f("abs/pwned2", b"y"), f("/absolute", b"z"),
        entry("hl", tarfile.LNKTYPE, linkname="up/pwned"),
    ]))
    assert list(outside.iterdir()) == []
    assert (root / "outside" / "pwned").read_bytes() == b"x"
    assert (root / str(outside).lstrip("/") / "pwned2").read_bytes() == b"y"
    assert (root / "absolute").read_bytes() == b"z" and (root / "hl").stat().st_nlink == 2
    with pytest.raises(ImageError, match="hardlink"):
        _apply(root, tar_bytes([entry("hl2", tarfile.LNKTYPE, linkname="does/not/exist")]))
    _apply(root, tar_bytes([d("absolute")]))  # a directory replaces a file
    assert (root / "absolute").is_dir()
    _apply(root, tar_bytes([entry("ghost/.wh.x"), entry("ghost2/.wh..wh..opq")]))  # nothing to hide: no dirs made
    assert not (root / "ghost").exists() and not (root / "ghost2").exists()
    with pytest.raises(ImageError, match="too many levels of symbolic links"):
        _apply(root, tar_bytes([entry("loop", tarfile.SYMTYPE, linkname="loop"), f("loop/x", b"")]))


_COMPARE = ["/", "/dev", "/etc", "/etc/secret", "/etc/hosts", "/etc/hosts.hard", "/etc/xattr-file", "/usr/bin/su-test",
            "/usr/bin/sg-test", "/usr/bin/cap-test", "/home/user", "/home/user/file", "/tmp", "/root", "/locked",
            "/locked/inside", "/home/user/with space",
            "/dev/null", "/dev/loop0", "/dev/fifo", "/bin/sh", "/bin/busybox", "/lib", "/usr/lib/libfoo.so"]


def test_unprivileged_build_matches_root_build(tmp_path: Path) -> None:
    """A build by an unprivileged user (debugfs replay) is identical, path for path, to a root build."""
    import shutil
    import tempfile
    if os.geteuid() != 0:
        pytest.skip("needs root to build both as root and as nobody; the unprivileged path is still covered by "
                    "test_pull_builds_faithful_rootfs[debugfs-replay]")
    work = Path(tempfile.mkdtemp(prefix="ma-unpriv-", dir="/tmp"))
    try:
        write_oci_layout(work / "layout", sample_image())
        subprocess.run(["chown", "-R", "65534:65534", str(work)], check=True)
        child = ("import sys; from microagent_engine.images.store import ImageStore; "
                 "print(ImageStore(sys.argv[1]).ensure_rootfs(sys.argv[2]))")
        proc = subprocess.run([require_tool("setpriv"), "--reuid", "65534", "--regid", "65534", "--clear-groups",
                               sys.executable, "-c", child, str(work / "state"), f"oci:{work / 'layout'}"],
                              capture_output=True, text=True, cwd="/")
        assert proc.returncode == 0, proc.stderr
        unpriv = Path(proc.stdout.strip())
        assert unpriv.stat().st_uid == 65534
        root = ImageStore(tmp_path / "state").ensure_rootfs(f"oci:{work / 'layout'}")
        for path in _COMPARE:
            a, b = stat_of(root, path), stat_of(unpriv, path)
            a.pop("Inode"), b.pop("Inode")
            assert a == b, path
        assert ls(root, "/etc") == ls(unpriv, "/etc")
        assert "hello" in debugfs(unpriv, "ea_get /etc/xattr-file user.test")
        for path in ("/usr/bin/cap-test", "/etc/xattr-file"):
            assert debugfs(root, f"ea_list {path}") == debugfs(unpriv, f"ea_list {path}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
