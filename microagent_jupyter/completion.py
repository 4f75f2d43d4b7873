"""Tab completion for ``%microagent`` / ``%%microagent``: subcommands, options, and workspace, volume, image and
profile names (an IPython v2 matcher)."""

from __future__ import annotations

from typing import Any, Callable, Iterable

from IPython.core.completer import CompletionContext, SimpleCompletion, SimpleMatcherResult, context_matcher
from IPython.core.error import UsageError

from microagent_engine.errors import MicroagentError
from microagent_engine.images.builtin import BUILTIN_NAMES

from . import magic_table
from ._engine import get_engine
from .magic_table import Subcommand


def _parser_of(entry: Subcommand | None) -> Any:
    return entry.parser() if entry is not None and entry.parser is not None else None


def _choices(parser: Any) -> list[str]:
    """The choices of the parser's first positional (volume and session actions)."""
    for action in parser._positionals._group_actions if parser is not None else ():
        return list(action.choices or ())
    return []


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


def _snapshots() -> list[str]:
    try:
        return [m["name"] for m in get_engine().snapshots()]
    except (MicroagentError, OSError):
        return []


def _images() -> list[str]:
    refs: list[str] = list(BUILTIN_NAMES)
    try:
        for img in get_engine().list_images():
            refs += [r for r in img.refs if r not in refs]
    except (MicroagentError, OSError):
        pass
    return refs


def _values_for(option: str, sub: str, parser: Any) -> list[str] | None:
    """Candidates for the value of ``option``: the parser's choices for it (profiles, network modes, ...), else
    what the engine has; None when the option takes no value we know how to complete."""
    action = parser._option_string_actions.get(option) if parser is not None else None
    if action is not None and action.choices:
        return [str(c) for c in action.choices]
    if option == "--image":
        return _images()
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
        return _matching(magic_table.names(), current)
    sub, args = words[0], words[1:]
    entry = _lookup(sub)
    parser = _parser_of(entry)
    if args and _takes_value(parser, args[-1]):
        values = _values_for(args[-1], sub, parser)
        return None if values is None else _matching(values, current)
    options = sorted({*(parser._option_string_actions if parser is not None else ()), "-h", "--help"})
    long_options = [o for o in options if o.startswith("--")]
    if current.startswith("-"):
        return _matching(long_options if len(current) > 2 else options, current)
    positionals = [a for i, a in enumerate(args)
                   if not a.startswith("-") and not (i and _takes_value(parser, args[i - 1]))]
    found = _POSITIONALS[entry.completes](positionals, parser) if entry is not None else []
    if found == [] and not current:  # no word to offer here: its options (else IPython offers Python names)
        return long_options if entry is not None else []
    return None if found is None else _matching(found, current)


def _lookup(sub: str) -> Subcommand | None:
    try:
        return magic_table.lookup(sub)
    except UsageError:
        return None


def _first(values: Callable[[], list[str]]) -> Callable[[list[str], Any], list[str]]:
    return lambda positionals, parser: [] if positionals else values()


def _cp(positionals: list[str], parser: Any) -> list[str] | None:
    """``WORKSPACE:`` for either side of a copy; host paths when no workspace matches and after both sides."""
    return ([f"{w}:" for w in _workspaces()] or None) if len(positionals) < 2 else None


def _output(positionals: list[str], parser: Any) -> list[str] | None:
    return _workspaces() if not positionals else None  # OUTPUT names need the record; HOST_DEST is a path


def _volume(positionals: list[str], parser: Any) -> list[str]:
    if not positionals:
        return [c for c in _choices(parser) if c not in ("ls", "rm")]
    return _volumes() if len(positionals) == 1 and positionals[0] in ("status", "delete", "rm") else []


def _session(positionals: list[str], parser: Any) -> list[str]:
    if not positionals:
        return _choices(parser)
    return _workspaces() if len(positionals) == 1 and positionals[0] != "list" else []


def _snapshot(positionals: list[str], parser: Any) -> list[str]:
    if not positionals:
        return ["list", "rm", *_workspaces()]
    return _snapshots() if positionals == ["rm"] else []


#: What each table entry's ``completes`` offers for its positional words (None: host paths).
_POSITIONALS: dict[str, Callable[[list[str], Any], list[str] | None]] = {
    "none": lambda positionals, parser: [], "workspace": _first(_workspaces), "image": _first(_images),
    "cp": _cp, "output": _output, "volume": _volume, "session": _session, "snapshot": _snapshot}


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
