"""Rich display objects: an HTML table in a notebook (``_repr_html_``), plain text in a terminal (``__repr__``)."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any, Sequence

from microagent_engine import WorkspaceInfo
from microagent_engine.render import status_fields, text_table

_STATE_COLORS = {"running": "#1a7f37", "starting": "#9a6700", "stopping": "#9a6700", "halted": "#57606a",
                 "stopped": "#57606a", "prepared": "#0969da", "failed": "#cf222e", "quarantined": "#8250df",
                 "paused": "#9a6700", "sleeping": "#0550ae"}

TABLE_STYLE = "border-collapse:collapse;font-family:var(--jp-code-font-family,monospace);font-size:12px"
CELL_STYLE = "padding:2px 10px;text-align:left;border-bottom:1px solid #d0d7de"


def state_badge(state: str) -> str:
    color = _STATE_COLORS.get(state, "#57606a")
    return (f'<span class="microagent-state microagent-state-{html.escape(state)}" '
            f'style="color:{color};font-weight:600">{html.escape(state)}</span>')


class Table:
    """Rows under a header. ``data`` keeps the machine-readable form (e.g. a list of ``to_json()`` dicts)."""

    def __init__(self, header: Sequence[str], rows: Sequence[Sequence[Any]], *, title: str = "",
                 data: Any = None, empty: str = "(none)", html_cells: Sequence[Sequence[str]] | None = None):
        self.header, self.rows, self.title, self.data, self.empty = list(header), [list(r) for r in rows], \
            title, data, empty
        self._html_cells = html_cells

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.data if self.data is not None else self.rows)

    def __repr__(self) -> str:
        body = text_table(self.rows, self.header) if self.rows else self.empty
        return f"{self.title}\n{body}" if self.title else body

    def _repr_html_(self) -> str:
        parts = ['<div class="microagent-table">']
        if self.title:
            parts.append(f"<b>{html.escape(self.title)}</b>")
        if not self.rows:
            parts.append(f"<div><i>{html.escape(self.empty)}</i></div></div>")
            return "".join(parts)
        parts.append(f'<table style="{TABLE_STYLE}"><thead><tr>')
        parts += [f'<th style="{CELL_STYLE}">{html.escape(h)}</th>' for h in self.header]
        parts.append("</tr></thead><tbody>")
        cells = self._html_cells or [[html.escape("" if c is None else str(c)) for c in r] for r in self.rows]
        for row in cells:
            parts.append("<tr>" + "".join(f'<td style="{CELL_STYLE}">{c}</td>' for c in row) + "</tr>")
        parts.append("</tbody></table></div>")
        return "".join(parts)


class Record:
    """Key/value pairs of one object (a workspace, a volume, an exec result)."""

    def __init__(self, title: str, fields: Sequence[tuple[str, Any]], data: Any = None):
        self.title, self.fields, self.data = title, list(fields), data

    def __getitem__(self, key: str) -> Any:
        return (self.data or dict(self.fields))[key]

    def __repr__(self) -> str:
        width = max((len(k) for k, _ in self.fields), default=0)
        lines = [self.title] + [f"{k + ':':<{width + 1}} {_plain(v)}" for k, v in self.fields]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        rows = "".join(f'<tr><th style="{CELL_STYLE}">{html.escape(k)}</th>'
                       f'<td style="{CELL_STYLE}">{_html_value(k, v)}</td></tr>' for k, v in self.fields)
        return (f'<div class="microagent-record"><b>{html.escape(self.title)}</b>'
                f'<table style="{TABLE_STYLE}"><tbody>{rows}</tbody></table></div>')


class Message:
    """A one-line outcome (``Workspace dev: halted``)."""

    def __init__(self, text: str, data: Any = None, state: str | None = None):
        self.text, self.data, self.state = text, data, state

    def __repr__(self) -> str:
        return self.text

    def _repr_html_(self) -> str:
        text = html.escape(self.text)
        if self.state:
            text = text.rsplit(html.escape(self.state), 1)[0] + state_badge(self.state)
        return f'<div class="microagent-message">{text}</div>'


def _plain(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return "" if value is None else str(value)


def _html_value(key: str, value: Any) -> str:
    if key.lower() == "state" and isinstance(value, str):
        return state_badge(value)
    return html.escape(_plain(value))


# ---- workspace-specific renderings ------------------------------------------------------------


def workspaces_table(infos: list[WorkspaceInfo], title: str = "") -> Table:
    header = ["NAME", "STATE", "ACCEL", "PROFILE", "MEMORY", "CPUS", "DISK", "NETWORK", "IMAGE"]
    rows, cells = [], []
    for info in infos:
        j = info.to_json()
        r = j["resources"]
        row = [j["name"], j["state"], j["accel"] or "", j["profile"], f"{r['memoryMiB']} MiB", r["cpuCount"],
               f"{r['sizeMiB']} MiB", j["network"], j["image"]]
        rows.append(row)
        cells.append([html.escape(str(row[0])), state_badge(j["state"])] + [html.escape(str(c)) for c in row[2:]])
    return Table(header, rows, title=title, data=[i.to_json() for i in infos], html_cells=cells,
                 empty="(no workspaces)")


def workspace_record(info: WorkspaceInfo) -> Record:
    """The fields ``microagent status`` prints (one rendering, :func:`microagent_engine.render.status_fields`),
    with the state as a coloured badge in HTML."""
    fields = [(label, text) for label, text in status_fields(info) if label != "Workspace"]
    return Record(f"Workspace {info.name}", fields, data=info.to_json())


def volumes_table(vols: list[Any]) -> Table:
    data = [v.to_json() if hasattr(v, "to_json") else dict(v) for v in vols]
    keys: list[str] = []
    preferred = ["name", "sizeMiB", "attached", "lastHolder", "createdAt", "path"]
    for d in data:
        for k in d:
            if k not in keys:
                keys.append(k)
    header = [k for k in preferred if k in keys] or keys
    rows = [[_plain(d.get(k)) for k in header] for d in data]
    return Table([h.upper() for h in header], rows, data=data, empty="(no volumes)")


def volume_record(vol: Any) -> Record:
    data = vol.to_json() if hasattr(vol, "to_json") else dict(vol)
    return Record(f"Volume {data.get('name', '')}", list(data.items()), data=data)


# ---- engine messages and output files in a notebook ---------------------------------------------

_CLI_HINT = re.compile(r"(?<![\w%/.-])microagent (?=[a-z])")


def notebook_wording(message: str) -> str:
    """An engine message with its CLI suggestions (``microagent halt ws``) as the magic the notebook user types
    (``%microagent halt ws``); the notebook's delete asks no confirmation, so ``--yes`` goes."""
    return _CLI_HINT.sub("%microagent ", message).replace(" --yes", "")


_IMAGE_MAGIC = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpeg"), (b"GIF87a", "gif"), (b"GIF89a", "gif"))


def _as_text(data: bytes) -> str | None:
    if b"\x00" in data:
        return None
    try:
        return data.decode()
    except UnicodeDecodeError:
        return None


def output_bytes(data: bytes, basename: str, directory: Path | None = None) -> Any:
    """How a notebook shows an output file's bytes: an image is displayed, text is shown, anything else is written
    to ``basename`` in ``directory`` (default: the current directory; an existing file is not overwritten)."""
    from IPython.display import SVG, Image

    for magic, fmt in _IMAGE_MAGIC:
        if data.startswith(magic):
            return Image(data=data, format=fmt)
    text = _as_text(data)
    if text is not None and basename.lower().endswith(".svg") and "<svg" in text:
        return SVG(data=text)
    if text is not None:
        return Text(text)
    target = (directory or Path.cwd()) / (basename or "output.bin")
    stem, n = target, 1
    while target.exists():
        target = stem.with_name(f"{stem.stem}-{n}{stem.suffix}")
        n += 1
    target.write_bytes(data)
    return Message(f"Binary output ({len(data)} bytes) written to {target}", {"path": str(target)})


class Text:
    """Plain text: as-is in a terminal, a <pre> block in a notebook."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text

    def _repr_html_(self) -> str:
        return f'<pre class="microagent-log">{html.escape(self.text)}</pre>'
