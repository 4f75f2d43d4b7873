"""Attachment flags, tar bundles (hostile archives included) and cp in/out of ext4 images via debugfs.

Real e2fsprogs: images are built with mkfs.ext4 and every result is read back with debugfs. No VMs.
"""

from __future__ import annotations

import io
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from microagent_engine.errors import HostError, InvalidArgument, InvalidState, NotFound
from microagent_engine.hostinfo import require_tool
from microagent_engine.storage import bundles, debugfs
from microagent_engine.model import (Attachment, parse_bundle_flag, parse_disk_flag, parse_volume_flag,
                                     validate_attachments)
from microagent_engine.storage.ext4 import fsck, make_ext4


@pytest.fixture(autouse=True)
def _e2fsprogs() -> None:
    for tool in ("mkfs.ext4", "debugfs", "e2fsck"):
        try:
            require_tool(tool)
        except HostError as exc:
            pytest.fail(str(exc), pytrace=False)


def raw_stat(image: Path, path: str) -> str:
    """debugfs's own answer, independent of the module under test."""
    proc = subprocess.run([require_tool("debugfs"), "-R", f'stat "{path}"', str(image)], capture_output=True,
                          text=True)
    return proc.stdout + proc.stderr


def snapshot(root: Path) -> dict[str, bytes | str]:
    out: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath, n)
            out[str(p.relative_to(root))] = p.read_bytes() if p.is_file() and not p.is_symlink() else "other"
    return out


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.ext4"
    make_ext4(path, 32)
    return path


# -- -v / --disk / --bundle -------------------------------------------------------------------------------
@pytest.fixture
def host_files(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    make_ext4(tmp_path / "data.ext4", 8)
    (tmp_path / "raw.img").write_bytes(b"\0" * 4096)
    (tmp_path / "ctxdir").mkdir()
    (tmp_path / "ctxdir" / "hello.txt").write_text("bundled file\n")
    for name in ("ctx.tar", "ctx.tar.gz", "ctx.tgz"):
        with tarfile.open(tmp_path / name, "w:gz" if name != "ctx.tar" else "w") as tf:
            tf.add(tmp_path / "ctxdir", arcname=".")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "fake.tar").write_text("not a tar at all" * 100)
    return tmp_path


def test_parse_volume_flag_table(host_files: Path) -> None:
    d = host_files
    ok = {
        "data:/work": Attachment("volume", "data", "data", "/work", False),
        "data:/work:ro": Attachment("volume", "data", "data", "/work", True),
        "my-vol.v2:/srv/x/": Attachment("volume", "my-vol.v2", "my-vol.v2", "/srv/x", False),
        f"{d}/data.ext4:/data": Attachment("disk", "data", f"{d}/data.ext4", "/data", False),
        "./data.ext4:/data:ro": Attachment("disk", "data", f"{d}/data.ext4", "/data", True),
        "ctx.tar:/ctx": Attachment("bundle", "ctx", f"{d}/ctx.tar", "/ctx", True),
        f"{d}/ctx.tar.gz:/ctx:rw": Attachment("bundle", "ctx", f"{d}/ctx.tar.gz", "/ctx", False),
        "./ctx.tgz:/ctx:ro": Attachment("bundle", "ctx", f"{d}/ctx.tgz", "/ctx", True),
    }
    for flag, want in ok.items():
        assert parse_volume_flag(flag) == want, flag
    bad = {
        f"{d}/ctxdir:/ctx": "is a host directory; host directories are never attached; package a directory as a "
                            "tar for ingress",
        "ctxdir:/ctx": "use cp against a stopped workspace",
        "./notes.txt:/n": "is not a volume name, a .ext4/.img disk or a .tar/.tar.gz/.tgz bundle",
        "notes.txt:/n": "is not a volume name",
        "./missing.ext4:/d": "does not exist",
        "./raw.img:/d": "is not an ext4 filesystem image",
        "./fake.tar:/d": "is not a tar archive",
        "data": "expected SRC:DST",
        "data:/w:rx": "mode 'rx' must be 'ro' or 'rw'",
        "data:/w:ro:x": "expected SRC:DST",
        "data:work": "must be an absolute guest path",
        "data:/": "is reserved",
        "data:/proc/x": "is reserved",
        "data:/a/../b": "must not contain '..'",
        "data:/a//b": "is not normalized; write it as '/a/b'",
        "data:/a b": "whitespace",
        "-bad:/w": "invalid volume name",
    }
    for flag, msg in bad.items():
        with pytest.raises((InvalidArgument, NotFound)) as exc:
            parse_volume_flag(flag)
        assert msg in str(exc.value), (flag, str(exc.value))


def test_parse_disk_and_bundle_flags(host_files: Path) -> None:
    d = host_files
    want = Attachment("disk", "db", f"{d}/data.ext4", "/mnt/db", True)
    assert parse_disk_flag(f"db={d}/data.ext4:/mnt/db:ro") == want
    assert parse_disk_flag(f"db={d}/data.ext4:/mnt/db").read_only is False
    assert parse_bundle_flag(f"config={d}/ctx.tar:/config:ro") == Attachment("bundle", "config", f"{d}/ctx.tar",
                                                                             "/config", True)
    assert parse_bundle_flag(f"config={d}/ctx.tar:/config").read_only is True
    for flag, msg in {f"{d}/data.ext4:/x": "expected NAME=PATH:MOUNT[:ro|rw]",
                      f"a/b={d}/data.ext4:/x": "must not contain '/'",
                      f"db={d}/raw.img:/x": "not an ext4 filesystem image",
                      f"db={d}/ctxdir:/x": "package a directory as a tar",
                      f"db={d}/data.ext4:x": "absolute"}.items():
        with pytest.raises((InvalidArgument, NotFound)) as exc:
            parse_disk_flag(flag)
        assert msg in str(exc.value), (flag, str(exc.value))
    with pytest.raises(InvalidArgument, match="is not a tar archive"):
        parse_bundle_flag(f"c={d}/fake.tar:/c")


def test_validate_attachments(host_files: Path) -> None:
    d = host_files
    a = parse_volume_flag("data:/work")
    b = parse_disk_flag(f"db={d}/data.ext4:/db")
    c = parse_bundle_flag(f"cfg={d}/ctx.tar:/cfg")
    assert validate_attachments([a, b, c]) == [a, b, c]
    with pytest.raises(InvalidArgument, match="mountpoint /work is used twice"):
        validate_attachments([a, parse_disk_flag(f"db={d}/data.ext4:/work")])
    with pytest.raises(InvalidArgument, match='two attached disks are named "data"'):
        validate_attachments([a, parse_volume_flag(f"{d}/data.ext4:/d")])
    with pytest.raises(InvalidArgument, match="is attached twice"):
        validate_attachments([b, parse_disk_flag(f"db2={d}/data.ext4:/db2")])
    validate_attachments([c, parse_bundle_flag(f"cfg2={d}/ctx.tar:/cfg2")])  # each bundle is its own disk
    assert Attachment.from_json(a.to_json()) == a and a.to_json()["readOnly"] is False


# -- cp via debugfs ---------------------------------------------------------------------------------------------
def test_copy_roundtrip_binary_parents_mode(image: Path, tmp_path: Path) -> None:
    src = tmp_path / "blob.bin"
    data = os.urandom(300_000) + bytes(range(256)) * 10
    src.write_bytes(data)
    os.chmod(src, 0o4750)
    debugfs.copy_in(image, src, "/deep/er/path/blob.bin")
    st = raw_stat(image, "/deep/er/path/blob.bin")
    assert "Type: regular    Mode:  04750" in st and f"Size: {len(data)}" in st and "User:     0   Group:     0" in st
    assert "Type: directory" in raw_stat(image, "/deep/er")
    assert debugfs.read_file(image, "/deep/er/path/blob.bin") == data
    assert debugfs.exists(image, "/deep/er/path/blob.bin") and not debugfs.exists(image, "/deep/nope")
    out = tmp_path / "out" / "blob.copy"
    out.parent.mkdir()
    debugfs.copy_out(image, "/deep/er/path/blob.bin", out)
    assert out.read_bytes() == data
    assert stat.S_IMODE(out.stat().st_mode) == 0o750  # setuid never lands on the host
    assert sorted(os.listdir(out.parent)) == ["blob.copy"]  # no temp files left
    debugfs.copy_out(image, "/deep/er/path/blob.bin", out.parent)  # into a directory: keeps the name
    assert (out.parent / "blob.bin").read_bytes() == data
    assert debugfs.list_dir(image, "/deep/er/path") == ["blob.bin"]
    debugfs.copy_in(image, src, "/with space/f g")
    assert debugfs.read_file(image, "/with space/f g") == data
    fsck(image, fix=False)


def test_copy_overwrite(image: Path, tmp_path: Path) -> None:
    src = tmp_path / "f"
    for content in (b"config-v1\n" * 1000, b"v2\n", os.urandom(200_000)):
        src.write_bytes(content)
        debugfs.copy_in(image, src, "/etc/app.conf")
        assert debugfs.read_file(image, "/etc/app.conf") == content
    fsck(image, fix=False)


def test_copy_in_full_disk_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    small = tmp_path / "small.ext4"
    make_ext4(small, 8)
    big = tmp_path / "big"
    big.write_bytes(os.urandom(20 * 1024 * 1024))
    with pytest.raises(InvalidState) as exc:
        debugfs.copy_in(small, big, "/big")
    assert str(exc.value).startswith(f"not enough space in {small}: ")
    assert "MiB free, file is 20 MiB; grow the disk with --size-mib" in str(exc.value)
    assert "File not found by ext2_lookup" in raw_stat(small, "/big")
    # the same, past the pre-check: debugfs's own "Could not allocate block" must not leave a short file
    monkeypatch.setattr(debugfs, "_blocks_needed", lambda size, bs: 0)
    with pytest.raises(InvalidState, match="not enough space"):
        debugfs.copy_in(small, big, "/dir/big")
    assert "File not found by ext2_lookup" in raw_stat(small, "/dir/big")
    fsck(small, fix=False)
    monkeypatch.undo()
    (tmp_path / "ok").write_bytes(b"fits")  # the space came back
    debugfs.copy_in(small, tmp_path / "ok", "/ok")
    assert debugfs.read_file(small, "/ok") == b"fits"


def test_copy_errors(image: Path, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    debugfs.copy_in(image, tmp_path / "f", "/dir/file")
    with pytest.raises(NotFound, match="/nope/x does not exist in"):
        debugfs.copy_out(image, "/nope/x", tmp_path / "o")
    with pytest.raises(NotFound, match="/nope does not exist in"):
        debugfs.read_file(image, "/nope")
    with pytest.raises(InvalidArgument, match="is a directory, not a regular file"):
        debugfs.copy_out(image, "/dir", tmp_path / "o")
    with pytest.raises(InvalidArgument, match="is a regular file, not a directory"):
        debugfs.copy_in(image, tmp_path / "f", "/dir/file/below")
    with pytest.raises(InvalidArgument, match="is a directory, not a regular file"):
        debugfs.copy_in(image, tmp_path / "f", "/dir")
    with pytest.raises(InvalidArgument, match="is a directory; cp copies one regular file"):
        debugfs.copy_in(image, tmp_path, "/x")
    with pytest.raises(NotFound, match="host file .* does not exist"):
        debugfs.copy_in(image, tmp_path / "missing", "/x")
    with pytest.raises(NotFound, match="disk image .* does not exist"):
        debugfs.copy_in(tmp_path / "none.ext4", tmp_path / "f", "/x")
    with pytest.raises(InvalidArgument, match="is not an ext4 image"):
        debugfs.read_file(tmp_path / "f", "/x")
    for bad in ("relative/x", "", "../etc/passwd", "/a/../../etc/passwd", "/dir/..", '/a"b', "/a\nb"):
        with pytest.raises(InvalidArgument):
            debugfs.copy_in(image, tmp_path / "f", bad)
        with pytest.raises(InvalidArgument):
            debugfs.copy_out(image, bad, tmp_path / "o")
    assert not (tmp_path / "o").exists()
    assert debugfs.normalize_guest_path("//etc/./app.conf/") == "/etc/app.conf"


# -- bundles ------------------------------------------------------------------------------------------------
def _tar(path: Path, members: list[tuple[str, str, object]], mode: str = "w") -> Path:
    """members: (name, kind, payload) with kind file/dir/sym/link/chr/fifo."""
    with tarfile.open(path, mode) as tf:
        for name, kind, payload in members:
            ti = tarfile.TarInfo(name)
            ti.mtime = 1_700_000_000
            if kind == "file":
                data = payload if isinstance(payload, bytes) else str(payload).encode()
                ti.size, ti.mode = len(data), 0o644
                tf.addfile(ti, io.BytesIO(data))
                continue
            ti.type = {"dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE, "link": tarfile.LNKTYPE,
                       "chr": tarfile.CHRTYPE, "fifo": tarfile.FIFOTYPE}[kind]
            ti.mode = 0o755
            if kind in ("sym", "link"):
                ti.linkname = str(payload)
            tf.addfile(ti)
    return path


@pytest.fixture
def canary(tmp_path: Path) -> Path:
    d = tmp_path / "canary"
    d.mkdir()
    (d / "keep.txt").write_text("untouched")
    return d


def test_bundle_from_real_tar_like_the_seed(tmp_path: Path) -> None:
    src = tmp_path / "config-dir"
    (src / "sub").mkdir(parents=True)
    (src / "hello.txt").write_text("bundled file\n")
    (src / "sub" / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(src / "sub" / "run.sh", 0o4755)
    os.symlink("/usr/bin/python3", src / "py")
    os.link(src / "hello.txt", src / "hello-link.txt")
    tar = tmp_path / "config.tar.gz"
    subprocess.run(["tar", "-C", str(src), "-czf", str(tar), "."], check=True)
    notes: list[str] = []
    out = bundles.build_bundle(tar, tmp_path / "bundle.ext4", tmp_path / "staging", notes)
    assert notes == [] and out == tmp_path / "bundle.ext4"
    assert debugfs.read_file(out, "/hello.txt") == b"bundled file\n"
    assert debugfs.read_file(out, "/hello-link.txt") == b"bundled file\n"
    assert "Links: 2" in raw_stat(out, "/hello.txt")
    assert "Type: regular    Mode:  04755" in raw_stat(out, "/sub/run.sh")
    assert "Type: symlink" in raw_stat(out, "/py") and 'Fast link dest: "/usr/bin/python3"' in raw_stat(out, "/py")
    assert os.listdir(tmp_path / "staging") == []  # staging removed
    assert sorted(p.name for p in tmp_path.iterdir()) == [".bundle.ext4.lock", "bundle.ext4", "config-dir",
                                                          "config.tar.gz", "staging"]
    size_mib = out.stat().st_size // (1024 * 1024)
    assert 16 <= size_mib <= 20
    fsck(out, fix=False)


def test_bundle_sized_for_content(tmp_path: Path) -> None:
    tar = _tar(tmp_path / "big.tar", [("blob", "file", b"\1" * (10 * 1024 * 1024))])
    out = bundles.build_bundle(tar, tmp_path / "big.ext4", tmp_path / "st")
    assert out.stat().st_size // (1024 * 1024) == 30  # 10 MiB x 1.3 + 16
    assert debugfs.read_file(out, "/blob") == b"\1" * (10 * 1024 * 1024)


@pytest.mark.parametrize("members, bad_member, why", [
    ([("ok.txt", "file", "fine"), ("../canary/evil.txt", "file", "pwned")], "../canary/evil.txt", "contains '..'"),
    ([("a/../../canary/evil.txt", "file", "pwned")], "a/../../canary/evil.txt", "contains '..'"),
    ([("CANARY/abs.txt", "file", "pwned")], "CANARY/abs.txt", "has an absolute path"),
    ([("link", "sym", "CANARY"), ("link/evil.txt", "file", "pwned")], "link/evil.txt", "lies below a symlink"),
    ([("up", "sym", "../../canary"), ("up/keep.txt", "file", "pwned")], "up/keep.txt", "lies below a symlink"),
    ([("hl", "link", "../canary/keep.txt")], "hl", "is a hardlink to '../canary/keep.txt', outside the archive"),
    ([("hl", "link", "CANARY/keep.txt")], "hl", "/canary/keep.txt', outside the archive"),
    ([("s", "sym", "CANARY"), ("hl", "link", "s/keep.txt")], "hl", "lies below a symlink"),
    ([("hl", "link", "missing.txt")], "hl", "not in the archive"),
], ids=["dotdot", "dotdot-nested", "absolute", "symlink-write-through", "relative-symlink-write-through",
        "hardlink-dotdot", "hardlink-absolute", "hardlink-through-symlink", "hardlink-missing"])
def test_hostile_bundles_never_escape(tmp_path: Path, canary: Path, members, bad_member, why) -> None:
    members = [(n.replace("CANARY", str(canary)), k, str(p).replace("CANARY", str(canary)) if k != "file" else p)
               for n, k, p in members]
    bad_member = bad_member.replace("CANARY", str(canary))
    before = snapshot(tmp_path)
    tar = _tar(tmp_path / "evil.tar", members)
    with pytest.raises(InvalidArgument) as exc:
        bundles.build_bundle(tar, tmp_path / "evil.ext4", tmp_path / "staging")
    assert f"member {bad_member!r} " in str(exc.value) and why in str(exc.value)
    assert "rebuild the archive" in str(exc.value)
    assert snapshot(canary) == {"keep.txt": b"untouched"}
    after = snapshot(tmp_path)
    after.pop("evil.tar")
    after.pop("staging")
    assert after == before  # nothing written anywhere else, no image, staging cleaned
    assert os.listdir(tmp_path / "staging") == []


def test_bundle_symlink_member_replaced_not_written_through(tmp_path: Path, canary: Path) -> None:
    tar = _tar(tmp_path / "t.tar", [("x", "sym", str(canary / "keep.txt")), ("x", "file", "replaced"),
                                    ("dev", "chr", None), ("pipe", "fifo", None), ("d", "dir", None),
                                    ("d/f", "file", "in dir")])
    notes: list[str] = []
    out = bundles.build_bundle(tar, tmp_path / "t.ext4", tmp_path / "staging", notes)
    assert snapshot(canary) == {"keep.txt": b"untouched"}
    assert debugfs.read_file(out, "/x") == b"replaced"
    assert debugfs.read_file(out, "/d/f") == b"in dir"
    assert notes == ["skipped 'dev': device nodes and fifos are not copied into bundles",
                     "skipped 'pipe': device nodes and fifos are not copied into bundles"]
    assert not debugfs.exists(out, "/dev") and not debugfs.exists(out, "/pipe")


def test_bundle_bad_archives(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(os.urandom(5000))
    with pytest.raises(InvalidArgument, match="is not a readable tar archive"):
        bundles.build_bundle(junk, tmp_path / "o.ext4", tmp_path / "st")
    good = _tar(tmp_path / "g.tar.gz", [("a.txt", "file", b"A" * 200_000), ("b.txt", "file", os.urandom(300_000))],
                mode="w:gz")
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(InvalidArgument, match="member 'b.txt' could not be read|is damaged"):
        bundles.build_bundle(cut, tmp_path / "o.ext4", tmp_path / "st")
    assert not (tmp_path / "o.ext4").exists() and os.listdir(tmp_path / "st") == []
    xz = _tar(tmp_path / "x.tar.xz", [("x.txt", "file", "xz ok")], mode="w:xz")
    assert debugfs.read_file(bundles.build_bundle(xz, tmp_path / "x.ext4", tmp_path / "st"), "/x.txt") == b"xz ok"


def _writer(image: str, src: str, dst: str) -> None:
    debugfs.copy_in(Path(image), Path(src), dst)


def test_concurrent_writers_are_serialized(image: Path, tmp_path: Path) -> None:
    import multiprocessing
    ctx = multiprocessing.get_context("fork")
    payloads = {f"/w/{i}/f.bin": os.urandom(50_000 + i) for i in range(6)}
    procs = []
    for i, (dst, data) in enumerate(payloads.items()):
        (tmp_path / f"src{i}").write_bytes(data)
        procs.append(ctx.Process(target=_writer, args=(str(image), str(tmp_path / f"src{i}"), dst)))
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    for dst, data in payloads.items():
        assert debugfs.read_file(image, dst) == data
    fsck(image, fix=False)


def test_copy_in_refuses_unrecovered_journal(image: Path, tmp_path: Path) -> None:
    subprocess.run([require_tool("debugfs"), "-w", "-R", "feature needs_recovery", str(image)], check=True,
                   capture_output=True)
    (tmp_path / "f").write_text("x")
    with pytest.raises(InvalidState, match="was not cleanly unmounted .* e2fsck -fy"):
        debugfs.copy_in(image, tmp_path / "f", "/f")
    assert not debugfs.exists(image, "/f")


def test_copy_out_keeps_holes_and_bytes(image: Path, tmp_path: Path) -> None:
    """Data at unaligned offsets around holes comes back byte-exact, and the holes stay holes on the host."""
    src = tmp_path / "holey.bin"
    pieces = {0: os.urandom(5000), (1 << 20) + 3: os.urandom(70000), (9 << 20) - 7: b"tail!!!"}
    with open(src, "wb") as fh:
        for off, data in pieces.items():
            fh.seek(off)
            fh.write(data)
    debugfs.copy_in(image, src, "/h/holey.bin")
    written = debugfs.copy_out(image, "/h/holey.bin", tmp_path / "back.bin")
    back = tmp_path / "back.bin"
    assert back.read_bytes() == src.read_bytes()
    allocated = os.stat(back).st_blocks * 512
    assert allocated <= 100 << 10 and written <= 100 << 10, (allocated, written)  # 75 KB of data in a 9 MiB file
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InvalidArgument, match=r"over the copy cap of 8\.0 MiB; nothing was copied"):
        debugfs.copy_out(image, "/h/holey.bin", out / "capped.bin", max_size=8 << 20)
    assert list(out.iterdir()) == []


def test_a_size_is_grown_once_per_base_and_each_clone_is_a_copy(tmp_path: Path) -> None:
    # workspaces of one image and size copy a sized copy of the base made once (fsck + resize2fs per base and size,
    # not per workspace); each clone is a clean ext4 of the size asked for; copies of a deleted base, and the least
    # recently used beyond the bounds, are removed
    from microagent_engine.storage import ext4

    images = tmp_path / "images"
    images.mkdir()
    base = images / "builtin-abc.ext4"
    make_ext4(base, 16)
    clones = []
    for n in range(3):
        dest = tmp_path / f"ws{n}.ext4"
        ext4.clone_sized(base, dest, 48)
        clones.append(dest)
    sized = sorted((images / ext4.SIZED_DIR).glob("*.ext4"))
    assert len(sized) == 1 and sized[0].name.startswith("builtin-abc.") and sized[0].name.endswith(".48M.ext4")
    made = sized[0].stat().st_ino
    for dest in clones:
        assert dest.stat().st_size == 48 << 20 and stat.S_IMODE(dest.stat().st_mode) == 0o600
        fsck(dest, fix=False)
        out = subprocess.run([require_tool("dumpe2fs"), "-h", str(dest)], capture_output=True, text=True).stdout
        assert "Block count:              12288" in out, out
    ext4.clone_sized(base, tmp_path / "small.ext4", 8)  # not larger than the base: a plain copy, nothing cached
    assert (tmp_path / "small.ext4").stat().st_size == 16 << 20
    for size in (32, 40, 64):  # a third size of one base evicts its least recently used
        ext4.clone_sized(base, tmp_path / f"s{size}.ext4", size)
    names = sorted(p.name.rsplit(".", 2)[1] for p in (images / ext4.SIZED_DIR).glob("*.ext4"))
    assert names == ["40M", "64M"], names
    assert all(p.stat().st_ino != made for p in (images / ext4.SIZED_DIR).glob("*.ext4"))
    ext4.drop_sized(base)
    assert not list((images / ext4.SIZED_DIR).glob("*.ext4"))


@pytest.mark.parametrize("size_mib", [16, 48, 300, 1024, 5000])
def test_the_overhead_is_counted_as_mkfs_counts_it(tmp_path: Path, size_mib: int) -> None:
    # mkfs.ext4 records the overhead (the kernel's count of metadata blocks); resize2fs clears it, and the sized
    # copies get it back from overhead_clusters, which must agree with mkfs on every layout it covers (the guest's
    # kernel agreeing with it is checked in test_vm_storage)
    from microagent_engine.storage import ext4

    image = tmp_path / "fs.ext4"
    make_ext4(image, size_mib)
    fields = ext4.superblock_fields(image)
    assert int(fields["Overhead clusters"]) == ext4.overhead_clusters(fields)
    base = tmp_path / "base.ext4"
    make_ext4(base, 16)
    ext4.clone_sized(base, tmp_path / "grown.ext4", size_mib + 16)
    grown = ext4.superblock_fields(tmp_path / "grown.ext4")
    assert "Overhead clusters" in grown, grown
