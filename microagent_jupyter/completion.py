"""Tab completion for ``%microagent`` / ``%%microagent``: subcommands, options, and workspace, volume, image and
profile names (an IPython v2 matcher)."""

from __future__ import annotations

from typing import Any, Iterable

from IPython.core.completer import CompletionContext, SimpleCompletion, SimpleMatcherResult, context_matcher

from microagent_engine.config import PROFILES
from microagent_engine.errors import MicroagentError
from microagent_engine.images.builtin import BUILTIN_NAMES

from ._engine import get_engine

SUBCOMMANDS = ("run", "exec", "ps", "list", "status", "logs", "create", "start", "halt", "stop", "kill", "delete",
               "cp", "outputs", "output", "volume", "prune", "help")
WORKSPACE_SUBCOMMANDS = ("exec", "status", "logs", "start", "halt", "stop", "kill", "delete", "rm", "outputs",
                         "output")
VOLUME_ACTIONS = ("create", "list", "status", "delete")


def _parser_of(sub: str) -> Any:
    from .magics import MicroagentMagics

    magic = {"run": MicroagentMagics._run_args, "exec": MicroagentMagics._exec_args,
             "create": MicroagentMagics._create_args, "status": MicroagentMagics._status_args,
             "logs": MicroagentMagics._logs_args, "volume": MicroagentMagics._volume_args,
             "volumes": MicroagentMagics._volume_args}.get(sub)
    return getattr(magic, "parser", None)


def _workspaces() -> list[str]:
    try:
        return [i.name for i in get_engine().list()]
    except (MicroagentError, OSError):
        return []


def _volumes() -> list[str]:
    try:
        return [v.name for v in get_engine().volumes.list()]
    except (MicroagentError, OSError):
        return []


def _images() -> list[str]:
    refs: list[str] = list(BUILTIN_NAMES)
    try:
        for img in get_engine().images.list():
            refs += [r for r in img.refs if r not in refs]
    except (MicroagentError, OSError):
        pass
    return refs


def _values_for(option: str, sub: str) -> list[str] | None:
    """Candidates for the value of ``option``; None when the option takes no value we know how to complete."""
    if option == "--image":
        return _images()
    if option == "--profile":
        return list(PROFILES)
    if option == "--network":
        return ["user", "isolated"]
    if option in ("-v", "--volume"):
        return [f"{v}:" for v in _volumes()]
    if option == "--name" and sub in ("run", "create"):
        return _workspaces()
    return None


def _takes_value(parser: Any, option: str) -> bool:
    action = parser._option_string_actions.get(option) if parser is not None else None
    return action is not None and action.nargs != 0


def completions(line: str) -> list[str] | None:
    """Candidates for the last word of ``line`` (the text up to the cursor, starting with ``%microagent``);
    None where host paths are expected (IPython's file completion then applies)."""
    words = line.split()
    if not words:
        return []
    words = words[1:]  # the magic's own name
    current = "" if line[-1:].isspace() else (words.pop() if words else "")
    if words[:1] == ["--state-dir"] or (words and words[0].startswith("--state-dir=")):
        words = words[2:] if words[0] == "--state-dir" else words[1:]
    if not words:
        return _matching(SUBCOMMANDS, current)
    sub, args = words[0], words[1:]
    parser = _parser_of(sub)
    if args and _takes_value(parser, args[-1]):
        values = _values_for(args[-1], sub)
        return None if values is None else _matching(values, current)
    if current.startswith("-"):
        options = sorted(parser._option_string_actions) if parser is not None else []
        return _matching([o for o in options if o.startswith("--") or len(current) <= 2], current)
    positionals = [a for i, a in enumerate(args)
                   if not a.startswith("-") and not (i and _takes_value(parser, args[i - 1]))]
    if sub in WORKSPACE_SUBCOMMANDS and not positionals:
        return _matching(_workspaces(), current)
    if sub == "run" and not positionals:
        return _matching(_images(), current)
    if sub in ("volume", "volumes"):
        if not positionals:
            return _matching(VOLUME_ACTIONS, current)
        if len(positionals) == 1 and positionals[0] in ("status", "delete", "rm"):
            return _matching(_volumes(), current)
    if sub == "cp" and len(positionals) < 2:
        return _matching([f"{w}:" for w in _workspaces()], current) or None
    if sub in ("cp", "output"):
        return None
    return []


def _matching(candidates: Iterable[str], prefix: str) -> list[str]:
    return [c for c in candidates if c.startswith(prefix)]


@context_matcher()
def microagent_matcher(context: CompletionContext) -> SimpleMatcherResult:
    """IPython (v2) matcher: our candidates, and only ours, on a ``%microagent``/``%%microagent`` line."""
    line = context.text_until_cursor
    if not line.lstrip().startswith("%microagent") and not line.lstrip().startswith("%%microagent"):
        return {"completions": [], "suppress": False}
    found = completions(line.lstrip())
    return {"completions": [SimpleCompletion(text=c, type="microagent") for c in found or []],
            "suppress": found is not None, "ordered": True}


def install_completer(ipython: Any) -> None:
    """Register the matcher with the shell's completer (once)."""
    completer = getattr(ipython, "Completer", None)
    if completer is not None and microagent_matcher not in completer.custom_matchers:
        completer.custom_matchers.append(microagent_matcher)


def uninstall_completer(ipython: Any) -> None:
    completer = getattr(ipython, "Completer", None)
    if completer is not None and microagent_matcher in completer.custom_matchers:
        completer.custom_matchers.remove(microagent_matcher)
