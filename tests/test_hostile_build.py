"""The hostile guest program (tests/hostile) builds, installs into a booted workspace and reaches the channel.

Only that the program can act is checked here; how the host answers each mode is the hardening tests' job.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hostile import build_hostile, install_hostile

from microagent_engine import Engine
from microagent_engine.errors import MicroagentError
from microagent_engine.hostinfo import is_static_elf

pytestmark = pytest.mark.vm


def test_build_is_static_and_cached(state_dir: Path) -> None:
    first = build_hostile(state_dir)
    assert is_static_elf(first)
    assert build_hostile(state_dir) == first
    assert first.parent == state_dir / "cache" and first.name.startswith("hostile-")


def test_hello_reaches_the_agent_channel(engine: Engine) -> None:
    name = "hostile"
    engine.create(name, profile="tiny")
    try:
        engine.start(name)
        path = install_hostile(engine, name)
        r = engine.exec(name, [path, "hello"], timeout=60)
        err = r.stderr.decode(errors="replace")
        assert r.exit_code == 0, err
        assert "found port org.microagent.agent (/dev/vport" in err
        assert "duplicated as our fd" in err
        assert "wrote HELLO with terminal escape sequences" in err
        assert "wrote READY again" in err
    finally:
        try:
            engine.kill(name)
        except MicroagentError:
            pass
        engine.delete(name)
