"""The workspace spec loader: microagent.yaml -> Engine.create keyword arguments, with file:line:field errors."""

from __future__ import annotations

import tarfile
import textwrap
from pathlib import Path

import pytest

from microagent_engine.errors import InvalidArgument
from microagent_engine.errors import SpecError
from microagent_engine.model import Attachment, FileCopy, Mediation, Output
from microagent_engine.spec import load_spec, parse_spec
from microagent_engine.spec_args import find_default_spec
from microagent_engine.workspace_spec import WorkspaceSpec

# The seed's full example; image 'builtin', host paths created under tmp_path by the fixture.
FULL = """\
name: research
image: builtin
profile: medium
restart: on-failure
entrypoint: /app/start.sh
shell: /bin/bash
hostname: research
setup:
  - mkdir -p /workspace
  - echo ready > /workspace/status
files:
  - src: ./body.py
    dst: /app/body.py
    mode: "0644"
env:
  MICROAGENT_NAME: research
resources:
  memoryMiB: 2048
  cpuCount: 2
  sizeMiB: 8192
mediation:
  enabled: true
  required: true
  port: 2048
  target: 127.0.0.1:9900
  failClosed: true
disks:
  - name: workspace
    path: ./workspace.ext4
    mountpoint: /workspace
    mode: rw
bundles:
  - name: config
    path: ./config.tar
    mountpoint: /config
    mode: ro
outputs:
  - name: report
    path: /workspace/report.json
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "body.py").write_text("print('hi')\n")
    (tmp_path / "workspace.ext4").write_bytes(bytes(1080) + b"\x53\xef" + bytes(100))  # ext4 superblock magic
    (tmp_path / "hello.txt").write_text("hello\n")
    with tarfile.open(tmp_path / "config.tar", "w") as tar:
        tar.add(tmp_path / "hello.txt", arcname="hello.txt")
    return tmp_path


def write(project: Path, text: str, name: str = "microagent.yaml") -> Path:
    path = project / name
    path.write_text(textwrap.dedent(text))
    return path


def error_of(project: Path, text: str) -> str:
    (project / "fake.tar").write_text("not a tar")
    path = write(project, text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert isinstance(info.value, InvalidArgument)
    return str(info.value).replace(str(path), "SPEC")


def test_full_example_maps_to_a_workspace_spec(project: Path) -> None:
    doc = load_spec(write(project, FULL))
    assert doc.name == "research"
    assert doc.workspace_spec() == WorkspaceSpec(**{
        "image": "builtin",
        "profile": "medium",
        "restart": "on-failure",
        "entrypoint": "/app/start.sh",
        "shell": "/bin/bash",
        "hostname": "research",
        "setup": ["mkdir -p /workspace", "echo ready > /workspace/status"],
        "files": [FileCopy(project / "body.py", "/app/body.py", 0o644)],
        "env": {"MICROAGENT_NAME": "research"},
        "memory_mib": 2048,
        "cpus": 2,
        "size_mib": 8192,
        "mediation": Mediation(2048, "127.0.0.1", 9900, required=True, fail_closed=True),
        "attachments": [Attachment("disk", "workspace", str(project / "workspace.ext4"), "/workspace", False),
                        Attachment("bundle", "config", str(project / "config.tar"), "/config", True)],
        "outputs": [Output("report", "/workspace/report.json")],
    })


def test_unset_fields_are_omitted_and_defaults_documented(project: Path) -> None:
    spec = parse_spec("image: builtin\n", project / "microagent.yaml")
    assert spec.workspace_spec() == WorkspaceSpec(image="builtin")
    assert spec.workspace_spec().to_json() == {"image": "builtin"}
    assert spec.effective_hostname("My_Box") == "my-box"
    mediation = parse_spec("mediation: {enabled: true, port: 2048, target: '[::1]:9900'}\n", Path("m.yaml"))
    assert mediation.workspace_spec() == WorkspaceSpec(mediation=Mediation(2048, "::1", 9900))
    assert mediation.workspace_spec().to_json()["mediation"]["target"] == "[::1]:9900"


def test_relative_src_is_relative_to_spec_dir_not_cwd(project: Path, tmp_path_factory, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    (project / "sub").mkdir()
    (project / "sub" / "run.sh").write_text("#!/bin/sh\n")
    spec = load_spec(write(project, """\
        files:
          - {src: sub/run.sh, dst: /app//./run.sh, mode: "755"}
          - {src: %s, dst: /app/body.py}
        """ % (project / "body.py")))
    assert spec.workspace_spec().files == (
        FileCopy(project / "sub" / "run.sh", "/app/run.sh", 0o755),
        FileCopy(project / "body.py", "/app/body.py", None),
    )


def test_env_numbers_keep_their_written_text(project: Path) -> None:
    spec = load_spec(write(project, "env:\n  PORT: 8080\n  VERSION: 1.10\n  EMPTY: ''\n"))
    assert spec.env == {"PORT": "8080", "VERSION": "1.10", "EMPTY": ""}


@pytest.mark.parametrize("text, message", [
    ("name: a\nimgae: builtin\n",
     "SPEC:2: imgae: unknown field; did you mean image? Allowed fields: name, image, profile, restart, entrypoint, "
     "shell, hostname, setup, files, env, resources, mediation, disks, bundles, outputs, network, publish, packages, "
     "secrets"),
    ("resources:\n  cpuCount: 2\n  memoryMB: 512\n",
     "SPEC:3: resources.memoryMB: unknown field; did you mean memoryMiB? Allowed fields: memoryMiB, cpuCount, "
     "sizeMiB"),
    ("files:\n  - src: body.py\n    dst: /b\n    owner: root\n",
     "SPEC:4: files[0].owner: unknown field; Allowed fields: src, dst, mode"),
    ("resources:\n  cpuCount: two\n",
     'SPEC:2: resources.cpuCount: expected a positive integer, got "two"'),
    ("resources:\n  memoryMiB: 0\n",
     "SPEC:2: resources.memoryMiB: must be a positive integer, got 0"),
    ("name: x\nfiles:\n  - src: body.py\n    dst: /app/body.py\n    mode: \"0999\"\n",
     'SPEC:5: files[0].mode: "0999" is not an octal file mode; use e.g. "0644"'),
    ("files:\n  - src: body.py\n    dst: /app/body.py\n    mode: 0644\n",
     'SPEC:4: files[0].mode: 0644 is a YAML number, which is ambiguous (0644 reads as octal, 644 as decimal); '
     'quote it, e.g. "0644"'),
    ("files:\n  - src: body.py\n    dst: /app/body.py\n    mode: \"17777\"\n",
     'SPEC:4: files[0].mode: "17777" is not an octal file mode; use e.g. "0644"'),
    ("files:\n  - src: body.py\n    dst: app/body.py\n",
     'SPEC:3: files[0].dst: "app/body.py" is not an absolute guest path; use e.g. "/app/body.py"'),
    ("files:\n  - src: body.py\n    dst: /app/../etc/passwd\n",
     "SPEC:3: files[0].dst: \"/app/../etc/passwd\" must not contain '..'; write the normalized absolute path"),
    ("files:\n  - src: body.py\n    dst: /app/\n",
     "SPEC:3: files[0].dst: \"/app/\" ends in '/'; give the full path of the file to write, e.g. \"/app/body.py\""),
    ("files:\n  - src: body.py\n    dst: /a\n  - src: body.py\n    dst: /a\n",
     'SPEC:5: files[1].dst: destination "/a" is already used by files[0].dst; each must be unique'),
    ("files:\n  - dst: /a\n",
     "SPEC:2: files[0]: missing required field 'src'"),
    ("profile: huge\n",
     'SPEC:1: profile: "huge" is not a profile; choose one of: tiny, small, medium, large'),
    ("restart: sometimes\n",
     'SPEC:1: restart: "sometimes" is not a restart policy; choose one of: never, on-failure, always'),
    ("env:\n  GOOD: x\n  1BAD: y\n",
     "SPEC:3: env.1BAD: invalid environment variable name; use letters, digits and '_', not starting with a digit"),
    ("env:\n  DEBUG: yes\n",
     'SPEC:2: env.DEBUG: yes is a YAML boolean; quote it to pass a string: "yes"'),
    ("env:\n  EMPTY:\n",
     'SPEC:2: env.EMPTY: has no value; write "" for an empty string or remove the variable'),
    ("env:\n  LIST: [a, b]\n",
     "SPEC:2: env.LIST: expected a string value, got a list"),
    ("mediation:\n  enabled: true\n  port: 70000\n  target: 127.0.0.1:9900\n",
     "SPEC:3: mediation.port: 70000 is out of range; use a vsock port from 1 to 65535"),
    ("mediation:\n  enabled: true\n  port: 2048\n  target: 127.0.0.1\n",
     'SPEC:4: mediation.target: "127.0.0.1" has no port; write it as host:port, e.g. "127.0.0.1:9900"'),
    ("mediation:\n  enabled: true\n  port: 2048\n",
     "SPEC:1: mediation: enabled: true needs 'target'; add mediation.target"),
    ("mediation:\n  required: true\n",
     "SPEC:2: mediation.required: required: true needs enabled: true; enable mediation or drop required"),
    ("mediation:\n  enabled: 'yes'\n",
     'SPEC:2: mediation.enabled: expected true or false, got "yes"'),
    ("name: a\nenv:\n  FOO: x\n  FOO: y\n",
     "SPEC:4: env.FOO: duplicate key (first set on line 3); remove one of them"),
    ("name: a\nname: b\n",
     "SPEC:2: name: duplicate key (first set on line 1); remove one of them"),
    ("name: bad/name\n",
     "SPEC:1: name: workspace name 'bad/name' must not contain '/' or '..'"),
    ("name: 2024\n",
     'SPEC:1: name: expected a string, got the number 2024; quote it: "2024"'),
    ("hostname: Bad_Host\n",
     "SPEC:1: hostname: \"Bad_Host\" is not a valid hostname; use up to 63 lowercase letters, digits and '-', not "
     "starting or ending with '-' (e.g. \"bad-host\")"),
    ("shell: bash\n",
     'SPEC:1: shell: "bash" is not an absolute path; use e.g. "/bin/sh" or "/bin/bash"'),
    ("setup: echo hi\n",
     'SPEC:1: setup: expected a list of shell commands, got "echo hi"'),
    ("setup:\n  - echo ok\n  - echo a: b\n",
     "SPEC:3: setup[1]: expected a command string, got a mapping; a ': ' inside a command makes YAML read it as a "
     "mapping, so quote the whole command"),
    ("image:\n",
     "SPEC:1: image: has no value; give a value or remove the field"),
    ("disks:\n  - name: data\n    path: ./missing.ext4\n    mountpoint: /data\n",
     "SPEC:3: disks[0].path: \"./missing.ext4\" does not exist (looked at TMP/missing.ext4); relative paths start at "
     "the spec file's directory"),
    ("disks:\n  - {name: data, path: config.tar, mountpoint: /data}\n",
     '''SPEC:2: disks[0].path: "config.tar" is a tar archive; list it under bundles, disks are existing ext4 images'''),
    ("bundles:\n  - {name: cfg, path: workspace.ext4, mountpoint: /cfg}\n",
     'SPEC:2: bundles[0].path: "workspace.ext4" is not a tar bundle; bundles must end in .tar, .tar.gz, .tgz '
     '(attach ext4 images under disks)'),
    ("disks:\n  - {name: data, path: workspace.ext4, mountpoint: /data, mode: rx}\n",
     'SPEC:2: disks[0].mode: "rx" is not a disk mode; choose one of: ro, rw'),
    ("disks:\n  - {name: data, path: workspace.ext4, mountpoint: /data}\n"
     "bundles:\n  - {name: data, path: config.tar, mountpoint: /cfg}\n",
     'SPEC:4: bundles[0].name: disk name "data" is already used by disks[0].name; each must be unique'),
    ("disks:\n  - {name: data, path: workspace.ext4, mountpoint: /data}\n"
     "bundles:\n  - {name: cfg, path: config.tar, mountpoint: /data/}\n",
     'SPEC:4: bundles[0].mountpoint: mountpoint "/data" is already used by disks[0].mountpoint; each must be unique'),
    ("outputs:\n  - {name: r, path: /o}\n  - {name: r, path: /p}\n",
     'SPEC:3: outputs[1].name: output name "r" is already used by outputs[0].name; each must be unique'),
    ("env:\n  1: x\n",
     'SPEC:2: env: key 1 is not a string; quote it: "1"'),
    ("env:\n  <<: {A: b}\n",
     "SPEC:2: env: YAML merge keys ('<<') are not supported; write the fields out"),
    ("a: &x [*x]\n",
     "SPEC:1: a[0]: a YAML alias refers to itself; write the value out"),
    ("disks:\n  - {name: data, path: body.py, mountpoint: /data}\n",
     "SPEC:2: disks[0].path: TMP/body.py is not an ext4 filesystem image (no ext4 superblock); build one with "
     "mkfs.ext4, or use a .tar bundle"),
    ("bundles:\n  - name: cfg\n    path: fake.tar\n    mountpoint: /cfg\n",
     "SPEC:3: bundles[0].path: TMP/fake.tar is not a tar archive; create one with: tar -C DIR -cf fake.tar ."),
    ("disks:\n  - name: data\n    path: workspace.ext4\n    mountpoint: /proc/x\n",
     "SPEC:4: disks[0].mountpoint: mountpoint '/proc/x' is reserved by the guest system; mount the disk somewhere "
     "else, e.g. /data"),
    ("resources: 512\n",
     "SPEC:1: resources: expected a mapping with fields memoryMiB, cpuCount, sizeMiB, got the number 512"),
])
def test_validation_errors_name_file_line_and_field(project: Path, text: str, message: str) -> None:
    assert error_of(project, text).replace(str(project), "TMP") == message


def test_missing_src_file(project: Path) -> None:
    message = error_of(project, "name: a\nfiles:\n  - src: ./nope.py\n    dst: /app/nope.py\n")
    assert message == (f'SPEC:3: files[0].src: "./nope.py" does not exist (looked at {project / "nope.py"}); '
                       f"relative paths start at the spec file's directory")


def test_src_directory_is_rejected(project: Path) -> None:
    (project / "dir").mkdir()
    message = error_of(project, "files:\n  - {src: dir, dst: /d}\n")
    assert message == (f'SPEC:2: files[0].src: "dir" is not a regular file ({project / "dir"}); a directory must '
                       f"be packed as a tar and listed under bundles")


def test_error_attributes(project: Path) -> None:
    path = write(project, "resources:\n  cpuCount: two\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert (info.value.file, info.value.line, info.value.field) == (path, 2, "resources.cpuCount")
    assert info.value.exit_code == 2


def test_malformed_yaml_tab(project: Path) -> None:
    message = error_of(project, "name: a\nenv:\n\tFOO: x\n")
    assert message == ("SPEC:3: invalid YAML: found character '\\t' that cannot start any token; indent with "
                       "spaces, not tabs")


def test_malformed_yaml_indentation(project: Path) -> None:
    message = error_of(project, "name: a\nresources:\n    cpuCount: 2\n  memoryMiB: 3\n")
    assert message.startswith("SPEC:4: invalid YAML: ")


def test_empty_and_comment_only_files(project: Path) -> None:
    expected = "SPEC:1: the spec is empty; add fields such as 'name:' and 'image:'"
    assert error_of(project, "") == expected
    assert error_of(project, "# nothing yet\n") == expected


def test_top_level_must_be_a_mapping(project: Path) -> None:
    assert error_of(project, "- name: a\n") == (
        "SPEC:1: the spec must be a mapping of fields (name:, image:, ...), not a list")
    assert error_of(project, "\n\njust text\n") == (
        "SPEC:3: the spec must be a mapping of fields (name:, image:, ...), not a single value")


def test_unknown_tag_and_multiple_documents(project: Path) -> None:
    assert error_of(project, "name: !custom a\n").startswith("SPEC:1: invalid YAML: could not determine a "
                                                              "constructor for the tag '!custom'")
    assert error_of(project, "name: a\n---\nname: b\n") == (
        "SPEC:2: invalid YAML: expected a single document in the stream, but found another document")


def test_unreadable_spec_files(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="spec file not found; check the --file path"):
        load_spec(tmp_path / "absent.yaml")
    with pytest.raises(SpecError, match="is a directory"):
        load_spec(tmp_path)


def test_find_default_spec(tmp_path: Path) -> None:
    assert find_default_spec(tmp_path) is None
    (tmp_path / "microagent.yml").write_text("name: a\n")
    assert find_default_spec(tmp_path) == tmp_path / "microagent.yml"
    (tmp_path / "microagent.yaml").write_text("name: a\n")
    with pytest.raises(SpecError) as info:
        find_default_spec(tmp_path)
    assert str(info.value) == (f"{tmp_path}: both microagent.yaml and microagent.yml exist; keep one (delete or "
                               f"rename the other) or choose with --file")
    (tmp_path / "microagent.yml").unlink()
    assert find_default_spec(tmp_path) == tmp_path / "microagent.yaml"


def test_merge_overrides_win_unless_none(project: Path) -> None:
    base = load_spec(write(project, FULL)).workspace_spec()
    merged = base.merged(WorkspaceSpec(profile="large", image=None, cpus=None, env={"EXTRA": "1"}, setup=["true"]))
    assert merged.profile == "large"
    assert merged.image == "builtin"
    assert merged.cpus == 2
    assert merged.env == {"MICROAGENT_NAME": "research", "EXTRA": "1"}
    assert merged.setup == ("true",)
    assert base.profile == "medium"  # inputs are not modified (they are frozen)
    assert WorkspaceSpec().merged(WorkspaceSpec(restart="always", hostname=None)).to_json() == {"restart": "always"}


def test_publish_entries(tmp_path):
    """``publish``: flag strings or {hostIp?, hostPort, guestPort}; an unquoted 8080:22 (a YAML number) is named."""
    spec = tmp_path / "microagent.yaml"
    spec.write_text('publish: ["8888:8888", {hostIp: 0.0.0.0, hostPort: 0, guestPort: 22}]\n')
    from microagent_engine.model import Publish
    assert load_spec(spec).workspace_spec().publish == (Publish(8888, 8888), Publish(0, 22, "0.0.0.0"))
    spec.write_text("publish: [8080:22]\n")
    with pytest.raises(SpecError, match=r'publish\[0\]: got the number .*quote the entry'):
        load_spec(spec)
    spec.write_text('publish: ["1:2", "1:3"]\n')
    with pytest.raises(SpecError, match="127.0.0.1:1 is published twice"):
        load_spec(spec)


def test_secrets_entries(tmp_path):
    """``secrets``: flag strings or {name, hosts, source?}; the values never come from the file."""
    from microagent_engine.secret import Secret

    spec = tmp_path / "microagent.yaml"
    spec.write_text('network: {allow: [api.example.com]}\n'
                    'secrets: ["TOKEN@api.example.com", {name: KEY, hosts: [api.example.com], source: "env:K"}]\n')
    assert load_spec(spec).workspace_spec().secrets == (Secret("TOKEN", ("api.example.com",)),
                                                       Secret("KEY", ("api.example.com",), "env:K"))
    spec.write_text('secrets: ["TOKEN@10.0.0.1"]\n')
    with pytest.raises(SpecError, match=r"microagent.yaml:1: secrets\[0\]: secret TOKEN: '10.0.0.1' is not a host"):
        load_spec(spec)
