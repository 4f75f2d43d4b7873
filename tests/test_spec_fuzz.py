"""A fuzzed spec corpus: hundreds of mutated and hostile specs, generated with a fixed seed, through ``load_spec``
(each under a per-case time limit) and a sample through ``microagent create --file``: 0 tracebacks, 0 hangs.

The corpus is generated here rather than stored: hostile cases (alias bombs, 1 MiB strings) are easier to read as
the code that makes them, and the seed makes every run the same.
"""

from __future__ import annotations

import json
import random
import signal
import string
from pathlib import Path
from typing import Iterator

import pytest

from microagent_engine.errors import MicroagentError
from microagent_engine.spec import MAX_SPEC_BYTES, load_spec

SEED = 20240610
PER_CASE_SECONDS = 10  # generous: a case is a few milliseconds; a hang is forever

VALID = """\
name: fuzz
image: builtin
profile: tiny
restart: on-failure
entrypoint: "python3 /app/main.py"
shell: /bin/sh
hostname: fuzz-host
setup:
  - "echo setup"
files:
  - src: ./body.py
    dst: /app/body.py
    mode: "0644"
env:
  PORT: "8080"
resources:
  memoryMiB: 256
  cpuCount: 1
  sizeMiB: 512
mediation:
  enabled: true
  port: 2048
  target: "127.0.0.1:9900"
outputs:
  - name: report
    path: /work/report.json
"""

HOSTILE_VALUES = [
    "null", "~", "true", "false", "0", "-1", "1e309", "-.inf", ".nan", "0x7fffffffffffffffffff", "0o777", "1_000",
    "9" * 60, "1:2:3:4:5", "2024-13-45", "2001-12-14t21:59:43.10-05:00", "[]", "{}", "[[[]]]", "{a: {b: {c: d}}}",
    "''", '""', '"\\0"', '"\\ud800"', '"\\x1b[2J"', '"\\u202e"', "\U0001F600", "ﬁ", "İ", "\u200b", "a" * 5000,
    "!!python/object/apply:os.system [id]", "!!python/name:os.system", "!!binary AAAA", "!!set {a, b}",
    "!!omap [{a: 1}]", "!!str", "!!int x", "!!float y", "!!timestamp z", "!foo bar", "&x 1", "*undefined",
    "<<: {a: 1}", "? [a]\n  : b", "|\n  block", ">-\n  folded", "'/etc/shadow'", "../../../../etc/shadow",
    "/dev/zero", "~/.ssh/id_rsa", "0644", "\"0999\"", "99999999999999999999", "-0", "+12", "0b101",
]
KEYS = ["name", "image", "profile", "restart", "entrypoint", "shell", "hostname", "setup", "files", "env",
        "resources", "mediation", "disks", "bundles", "outputs", "src", "dst", "mode", "memoryMiB", "cpuCount",
        "sizeMiB", "port", "target", "enabled", "required", "failClosed", "path", "mountpoint", "bogus", "NAME",
        "é", "a b", "\"\\t\"", "1", "null", "true"]


def alias_bomb(levels: int, width: int) -> str:
    lines = ["l0: &l0 [" + ", ".join(["lol"] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def hostile_specs() -> Iterator[tuple[str, str]]:
    """Hand-made hostile cases."""
    yield "alias-bomb", alias_bomb(10, 9)
    yield "alias-bomb-wide", alias_bomb(3, 60)
    yield "alias-bomb-in-setup", "a: &a [" + ", ".join(["x"] * 100) + "]\n" + \
        "setup: [" + ", ".join(["*a"] * 60) + "]\n"
    yield "deep-flow-seq", "setup: " + "[" * 20000 + "]" * 20000 + "\n"
    yield "deep-flow-map", "env: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n"
    yield "deep-block", "".join("  " * i + f"k{i}:\n" for i in range(300))
    yield "unclosed-flow", "setup: " + "[" * 10000 + "\n"
    yield "self-alias", "a: &a [*a]\n"
    yield "nul", "name: a\0b\n"
    yield "nul-escape", 'name: "a\\0b"\n'
    yield "bell", "name: a\x07\n"
    yield "huge-string", "image: " + "x" * (MAX_SPEC_BYTES - 100) + "\n"
    yield "too-big", "# " + "x" * (MAX_SPEC_BYTES + 10) + "\n"
    yield "huge-int", "resources:\n  sizeMiB: " + "9" * 4400 + "\n"
    yield "sexagesimal", "resources:\n  sizeMiB: 1" + ":59" * 50000 + "\n"
    yield "huge-sizes", "resources:\n  sizeMiB: 1000000000\n  memoryMiB: 100000000\n  cpuCount: 100000\n"
    yield "duplicate-keys", "name: a\nname: b\n"
    yield "python-object", "image: !!python/object/apply:os.system ['id']\n"
    yield "python-map", "resources: !!python/object:builtins.dict {}\n"
    yield "shadow", "files:\n  - src: /etc/shadow\n    dst: /s\n"
    yield "dotdot-shadow", "files:\n  - src: ../../../../etc/shadow\n    dst: /s\n"
    yield "surrogate-key", '"\\ud800": 1\n'
    yield "escape-key", '"\\e[31mred": 1\n'
    yield "bidi", "name: \u202eevil\n"
    yield "bom", "\ufeffname: ok\n"
    yield "tabs", "name:\tx\n\tprofile: tiny\n"
    yield "merge-key", "base: &b {name: x}\n<<: *b\n"
    yield "complex-key", "? [a, b]\n: c\n"
    yield "multi-doc", "name: a\n---\nname: b\n"
    yield "directive", "%YAML 9.9\n---\nname: a\n"
    yield "empty", ""
    yield "list-top", "- a\n- b\n"
    yield "scalar-top", "just text\n"
    yield "only-comment", "# nothing\n"


def mutated_specs(rng: random.Random, count: int) -> Iterator[tuple[str, str]]:
    """The valid spec with lines dropped, swapped, retyped, re-keyed, re-indented or garbled."""
    base = VALID.splitlines()
    for i in range(count):
        lines = list(base)
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(8)
            j = rng.randrange(len(lines))
            line = lines[j]
            indent = line[: len(line) - len(line.lstrip())]
            if op == 0:  # value replaced by a hostile one
                key = line.split(":", 1)[0]
                lines[j] = f"{key}: {rng.choice(HOSTILE_VALUES)}" if ":" in line else f"{indent}- {rng.choice(HOSTILE_VALUES)}"
            elif op == 1:  # key replaced
                lines[j] = f"{indent}{rng.choice(KEYS)}:{line.split(':', 1)[1] if ':' in line else ' x'}"
            elif op == 2:
                del lines[j]
            elif op == 3:
                lines.insert(j, line)  # duplicate key
            elif op == 4:
                lines[j] = " " * rng.randrange(7) + line.lstrip()
            elif op == 5:
                k = rng.randrange(len(line) + 1)
                lines[j] = line[:k] + rng.choice(string.punctuation + "\t\x7f\u00a0\u2028") + line[k:]
            elif op == 6:
                lines[j] = line[: rng.randrange(len(line) + 1)]
            else:
                lines.insert(j, f"{indent}{rng.choice(KEYS)}: {rng.choice(HOSTILE_VALUES)}")
            if not lines:
                lines = ["x"]
        yield f"mutant-{i}", "\n".join(lines) + "\n"


def random_specs(rng: random.Random, count: int) -> Iterator[tuple[str, str]]:
    """Random YAML-ish structures made from the known keys and hostile values, as JSON (valid YAML)."""
    def value(depth: int) -> object:
        kind = rng.randrange(6 if depth < 6 else 3)
        if kind == 0:
            return rng.choice([None, True, False, 0, -1, 2 ** 70, 1.5, float("1e308")])
        if kind in (1, 2):
            return rng.choice(HOSTILE_VALUES + KEYS)
        if kind == 3:
            return [value(depth + 1) for _ in range(rng.randrange(4))]
        return {rng.choice(KEYS): value(depth + 1) for _ in range(rng.randrange(5))}
    for i in range(count):
        yield f"random-{i}", json.dumps({rng.choice(KEYS): value(0) for _ in range(rng.randrange(1, 8))})


def corpus() -> list[tuple[str, str]]:
    rng = random.Random(SEED)
    return list(hostile_specs()) + list(mutated_specs(rng, 400)) + list(random_specs(rng, 200))


class Hang(Exception):
    pass


def _alarm(_signum, _frame):  # type: ignore[no-untyped-def]
    raise Hang()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "body.py").write_text("print('hi')\n")
    return tmp_path


def test_corpus_gives_only_spec_errors(project: Path) -> None:
    cases = corpus()
    assert len(cases) >= 600
    spec = project / "microagent.yaml"
    tracebacks, hangs, accepted = [], [], 0
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        for label, text in cases:
            spec.write_text(text, encoding="utf-8", errors="surrogatepass")
            signal.alarm(PER_CASE_SECONDS)
            try:
                load_spec(spec).workspace_spec()
                accepted += 1
            except MicroagentError as exc:
                str(exc).encode("utf-8")  # printable as a message (no lone surrogates)
            except Hang:
                hangs.append(label)
            except BaseException as exc:  # noqa: BLE001 - this is what the test hunts
                tracebacks.append(f"{label}: {type(exc).__name__}: {str(exc)[:200]}")
            finally:
                signal.alarm(0)
    finally:
        signal.signal(signal.SIGALRM, old)
    assert not hangs, hangs
    assert not tracebacks, "\n".join(tracebacks)
    assert 0 < accepted < len(cases)  # the mutants include some valid specs, so the fuzzer reaches validation


def test_cli_create_file_sample_gives_no_traceback(project: Path, cli) -> None:
    rng = random.Random(SEED + 1)
    hostile = list(hostile_specs())
    sample = hostile[:12] + rng.sample(corpus()[len(hostile):], 8)
    for label, text in sample:
        spec = project / "microagent.yaml"
        spec.write_text(text, encoding="utf-8", errors="surrogatepass")
        proc = cli("create", "--file", str(spec), "--name", "fuzz-cli", timeout=120,
                   env={"MICROAGENT_DOCKER_IO_REGISTRY": "127.0.0.1:9"})  # an image name never reaches the network
        assert b"Traceback" not in proc.stderr, (label, proc.stderr[-2000:])
        if proc.returncode == 0:
            cli("delete", "fuzz-cli", "--yes")
        else:
            assert proc.returncode in (1, 2, 3) and b"microagent: error:" in proc.stderr, \
                (label, proc.returncode, proc.stderr[-500:])
