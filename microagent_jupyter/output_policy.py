"""Host-side output policy: every MIME bundle from a guest kernel passes here before it reaches a frontend.

JupyterLab renders the outputs of the *running* kernel as trusted: scripts and event handlers in ``text/html``
run, ``application/javascript`` runs, in the Jupyter origin, where they can call the server's API with the
user's credentials. A sandboxed kernel's output is therefore hostile input. The rules, per MIME type:

* an **allow-list** of types, not a block-list: a type not listed below (``application/javascript``,
  ``text/javascript``, widget views, plotly/vega/bokeh bundles, ``application/x-…``) is dropped and a visible note
  says which. Widget views can be allow-listed (``allow_widgets``) — their comms are still refused by the relay.
* ``text/html`` is **sanitized** with nh3 (the Ammonia sanitizer): no ``<script>``/``<style>``/``<iframe>``/
  ``<object>``/``<form>``/``<link>``/``<meta>``/``<base>``, no event-handler, ``class`` or unknown attributes.
  **Nothing is fetched on render**: images only as ``data:image/{png,jpeg,gif,webp}``; a remote ``<img>`` becomes
  visible text naming its URL; style values that could load anything (``url()``, ``image-set``…) are dropped.
  **Links** only to absolute ``http(s)://host/…`` URLs off this machine (no ``http:/logout``, relative, ``//host``,
  backslash or loopback forms, never ``server_origins``), ``mailto:`` and ``#fragments``; a kept link shows where
  it goes (title, and the host beside its text). Each output sits in :data:`CONTAINER`, whose paint containment
  clips the markup to its own output area (no fake toasts over Lab). Sanitizing (rather than an
  ``<iframe sandbox srcdoc>`` through a MIME renderer of the labextension) works in every frontend, in saved
  notebooks and nbconvert, and keeps a DataFrame's table inline, sized and searchable; what it loses
  (script-driven widgets such as plotly) could not run in the sandbox's model anyway.
* ``text/markdown`` is rendered to HTML on the host (mistune, as nbconvert does) and that HTML is sanitized
  like ``text/html`` and sent *as* ``text/html``: the frontend's Markdown renderer, which passes raw HTML and
  ``javascript:`` links through for trusted outputs, never sees guest Markdown.
* ``image/svg+xml`` is parsed (no DOCTYPE, so no entities) and rebuilt from an allow-list of SVG elements and
  attributes: no ``<script>``, ``<foreignObject>``, ``<animate>``/``<set>``, no ``on*`` handlers, ``href`` only to
  ``#fragments`` or raster ``data:`` images, no ``url()`` other than ``url(#id)``.
* raster images must be base64 and are bounded; ``text/plain``/``application/json`` are inert in every frontend;
  ``text/latex`` is passed unless it uses MathJax's link/HTML commands (``\\href``, ``\\class``, …).
* **sizes**: one bundle at most ``max_output_bytes``, one cell at most ``max_cell_bytes`` for its text and rich
  output together (counted on what is sent); beyond that a bundle is replaced by a note and text is cut with one
  truncation note. HTML nested over :data:`MAX_HTML_DEPTH` and SVG over :data:`MAX_SVG_DEPTH` are dropped with a
  note (every rule is iterative or depth-bounded); no input makes the policy raise.
* **metadata** keeps only ``width``/``height``/``unconfined`` (numbers/bool) per image type, ``expanded`` for
  JSON and ``isolated: true`` (never ``false``); everything else is dropped.
"""

from __future__ import annotations

import base64
import binascii
import functools
import html
import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any

import nh3

NOTE_PREFIX = "[microagent]"
KiB, MiB = 1024, 1024 * 1024
DEFAULT_MAX_OUTPUT_BYTES = 8 * MiB
DEFAULT_MAX_CELL_BYTES = 32 * MiB
#: what an ipywidget's output is (its model lives in the kernel: nothing to show without a comm)
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
MAX_TEXT_CHARS = 4 * MiB  # one text/plain, stream or traceback entry
MAX_METADATA_BYTES = 4 * KiB

RASTER_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")
TEXT_TYPES = ("text/plain", "application/json", "text/latex")
SANITIZED_TYPES = ("text/html", "text/markdown", "image/svg+xml")
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
SAFE_TYPES = frozenset(RASTER_TYPES + TEXT_TYPES + SANITIZED_TYPES)

# ---- HTML ------------------------------------------------------------------------------------------
_HTML_TAGS = (set(nh3.ALLOWED_TAGS) - {"area", "map"}) | {"font"}
_HTML_ATTRIBUTES: dict[str, set[str]] = {  # no "class": Lab's own CSS classes would style guest markup
    "*": {"id", "title", "lang", "dir", "align", "valign", "style"},
    "a": {"href", "name"},
    "img": {"src", "alt", "width", "height"},
    "table": {"border", "cellpadding", "cellspacing", "summary", "width"},
    "td": {"colspan", "rowspan", "headers", "width", "nowrap"},
    "th": {"colspan", "rowspan", "headers", "scope", "width", "nowrap"},
    "col": {"span", "width"}, "colgroup": {"span", "width"},
    "ol": {"start", "type", "reversed"}, "li": {"value"},
    "font": {"color", "size"}, "time": {"datetime"}, "data": {"value"},
    "details": {"open"}, "del": {"datetime"}, "ins": {"datetime"}, "q": {"cite"}, "blockquote": {"cite"},
}
# style="" keeps only these properties (none of them takes a url(); values that try one are dropped whole)
_STYLE_PROPERTIES = {
    "color", "background-color", "text-align", "vertical-align", "font-weight", "font-style", "font-size",
    "font-family", "text-decoration", "white-space", "border", "border-collapse", "border-spacing", "border-color",
    "border-style", "border-width", "border-top", "border-bottom", "border-left", "border-right", "padding",
    "padding-left", "padding-right", "padding-top", "padding-bottom", "margin", "margin-left", "margin-right",
    "margin-top", "margin-bottom", "width", "height", "max-width", "max-height", "min-width", "display",
    "text-overflow", "overflow", "line-height", "list-style-type",
}
_STYLE_BAD = re.compile(r"url\s*\(|image|\\|expression|@|src\s*\(|element\s*\(|fixed|sticky", re.IGNORECASE)
_URL_ATTRIBUTES = {"href", "src", "cite"}
_DATA_IMAGE = re.compile(r"data:image/(png|jpeg|gif|webp);base64,[A-Za-z0-9+/=\s]*\Z", re.IGNORECASE)
_URL_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]*):")
_WEB_URL = re.compile(r"https?://[^/?#@\\\s]*@?[^/?#\\\s]+([/?#][^\\\s]*)?\Z", re.IGNORECASE)
MAX_HTML_DEPTH = 256  # html5ever's cost grows with the square of the open-element depth
_VOID_TAGS = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param",
                        "source", "track", "wbr"})
_TAG = re.compile(r"<(/?)([a-zA-Z][a-zA-Z0-9-]*)[^>]*?(/?)>")


class UnsafeMarkup(ValueError):
    """Markup that cannot be sanitized within the policy's bounds (too deep, unparsable)."""


def web_url(value: str, server_origins: frozenset[str] = frozenset()) -> str | None:
    """``value`` when it is an absolute ``http(s)://host/…`` URL to somewhere other than this machine's loopback
    or one of ``server_origins`` (the Jupyter server's own), else None. Whitespace, control characters and
    backslashes (which browsers fold into ``/``) refuse the URL rather than being repaired."""
    from urllib.parse import urlsplit

    v = value.strip()
    if not _WEB_URL.match(v) or any(ord(c) < 0x21 or c == "\x7f" for c in v):
        return None
    try:
        parts = urlsplit(v)
        host = (parts.hostname or "").rstrip(".").lower()
        port = parts.port
    except ValueError:
        return None
    if not host or host == "localhost" or host.endswith(".localhost"):
        return None
    try:
        import ipaddress

        ip = ipaddress.ip_address(host.strip("[]"))
        if ip.is_loopback or ip.is_unspecified or (ip.version == 6 and ip.ipv4_mapped is not None
                                                   and (ip.ipv4_mapped.is_loopback or ip.ipv4_mapped.is_unspecified)):
            return None
    except ValueError:
        if host.replace(".", "").isdigit() or host.startswith("0x"):  # 2130706433, 0x7f.1: numeric host forms
            return None
    origin = f"{parts.scheme.lower()}://{host}" + (f":{port}" if port else "")
    if origin in server_origins or f"{parts.scheme.lower()}://{host}" in server_origins:
        return None
    return v


def _safe_url(tag: str, value: str) -> bool:
    v = value.strip()
    if v.startswith("#") and tag == "a":
        return True
    m = _URL_SCHEME.match("".join(v.split()))
    if m is None:  # relative URL: would resolve against the Jupyter server's origin (its API): refused
        return False
    scheme = m.group(1).lower()
    if scheme == "data":
        return tag == "img" and _DATA_IMAGE.match(v) is not None
    if scheme == "mailto":
        return tag == "a" and v.lower().startswith("mailto:")
    # img: an absolute web URL survives nh3 only to be turned into visible text by _rewrite (never fetched)
    return tag in ("a", "img") and web_url(v) is not None


def _attribute_filter(tag: str, attr: str, value: str) -> str | None:
    if attr in _URL_ATTRIBUTES and not _safe_url(tag, value):
        return None
    if attr == "cite":
        return None if _URL_SCHEME.match(value.strip()) is None else value
    if attr in ("id", "name"):  # never clobber the page's own ids (DOM clobbering)
        return "microagent-" + value if value else None
    if attr == "style" and _STYLE_BAD.search(value):
        return None
    return value


_CLEANER = nh3.Cleaner(
    tags=_HTML_TAGS,
    clean_content_tags={"script", "style", "iframe", "object", "embed", "noscript", "template", "svg", "math",
                        "textarea", "select", "form", "frameset", "frame", "applet"},
    attributes=_HTML_ATTRIBUTES,
    attribute_filter=_attribute_filter,
    url_schemes={"http", "https", "mailto", "data"},
    filter_style_properties=_STYLE_PROPERTIES,
    strip_comments=True,
    link_rel="noopener noreferrer nofollow",
)

# nh3 serialises every attribute as name="value" with '"' escaped, so these match its output exactly
_ATTR = re.compile(r'([a-zA-Z][a-zA-Z0-9_:-]*)="([^"]*)"')
_IMG = re.compile(r'<img\b(?:[^>"]|"[^"]*")*>', re.IGNORECASE)
_LINK = re.compile(r'<a\b((?:[^>"]|"[^"]*")*)>(.*?)</a>', re.IGNORECASE | re.DOTALL)
#: every sanitized HTML output sits in this box: paint containment clips whatever the markup does (negative
#: margins, oversized boxes) to the output area and makes it the containing block of anything positioned
CONTAINER = '<div style="contain: paint; overflow: auto; position: relative; max-width: 100%">'


def _html_depth(source: str) -> int:
    depth = peak = 0
    for m in _TAG.finditer(source):
        name = m.group(2).lower()
        if name in _VOID_TAGS or m.group(3):
            continue
        depth = max(0, depth - 1) if m.group(1) else depth + 1
        peak = max(peak, depth)
    return peak


def _rewrite_img(m: re.Match[str]) -> str:
    attrs = dict(_ATTR.findall(m.group(0)))
    src = html.unescape(attrs.get("src", ""))
    if _DATA_IMAGE.match(src.strip()):
        return m.group(0)
    if not src:
        return ""
    return f'<span title="remote image, not loaded">[remote image not loaded: {html.escape(src)}]</span>'


def _rewrite_link(server_origins: frozenset[str], m: re.Match[str]) -> str:
    attrs = dict(_ATTR.findall(m.group(1)))
    href = html.unescape(attrs.get("href", ""))
    inner = m.group(2)
    if not href.lower().startswith(("http://", "https://")):
        return m.group(0)
    if web_url(href, server_origins) is None:  # the Jupyter server's own origin: the text stays, the link goes
        return inner
    from urllib.parse import urlsplit

    host = urlsplit(href).hostname or ""
    kept = " ".join(f'{k}="{v}"' for k, v in attrs.items() if k != "title")
    shown = "" if host and host in html.unescape(re.sub(r"<[^>]*>", "", inner)) else \
        f' <span>({html.escape(host)})</span>'
    return f'<a {kept} title="{html.escape(href)}">{inner}</a>{shown}'


def sanitize_html(source: str, server_origins: frozenset[str] = frozenset()) -> str:
    """Sanitized HTML fragment: only inert markup (see the module docstring for the rules), in the clipping
    :data:`CONTAINER`. Raises :class:`UnsafeMarkup` for markup nested deeper than :data:`MAX_HTML_DEPTH`."""
    if _html_depth(source) > MAX_HTML_DEPTH:
        raise UnsafeMarkup(f"HTML nested deeper than {MAX_HTML_DEPTH} elements")
    cleaned = _CLEANER.clean(source)
    cleaned = _LINK.sub(functools.partial(_rewrite_link, server_origins), _IMG.sub(_rewrite_img, cleaned))
    return f"{CONTAINER}{cleaned}</div>" if cleaned else ""


def markdown_to_safe_html(source: str, server_origins: frozenset[str] = frozenset()) -> str:
    """Render Markdown on the host, then sanitize the HTML (guest Markdown never reaches a frontend renderer)."""
    import mistune

    return sanitize_html(mistune.html(source), server_origins)


# ---- SVG -------------------------------------------------------------------------------------------
SVG_NS, XLINK_NS = "http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"
_SVG_ELEMENTS = {
    "svg", "g", "defs", "symbol", "use", "path", "rect", "circle", "ellipse", "line", "polyline", "polygon",
    "text", "tspan", "textPath", "title", "desc", "clipPath", "mask", "pattern", "marker", "linearGradient",
    "radialGradient", "stop", "image", "style", "switch", "filter", "feGaussianBlur", "feOffset", "feBlend",
    "feColorMatrix", "feComposite", "feFlood", "feMerge", "feMergeNode", "feMorphology",
}
_SVG_ATTRIBUTES = {
    "id", "class", "x", "y", "x1", "y1", "x2", "y2", "cx", "cy", "r", "rx", "ry", "width", "height", "d",
    "points", "transform", "viewBox", "preserveAspectRatio", "version", "fill", "fill-opacity", "fill-rule",
    "stroke", "stroke-width", "stroke-opacity", "stroke-linecap", "stroke-linejoin", "stroke-dasharray",
    "stroke-dashoffset", "stroke-miterlimit", "opacity", "clip-path", "clip-rule", "mask", "font-family",
    "font-size", "font-weight", "font-style", "text-anchor", "dominant-baseline", "alignment-baseline",
    "letter-spacing", "dx", "dy", "rotate", "offset", "stop-color", "stop-opacity", "gradientUnits",
    "gradientTransform", "patternUnits", "patternTransform", "clipPathUnits", "markerWidth", "markerHeight",
    "refX", "refY", "orient", "markerUnits", "marker-start", "marker-mid", "marker-end", "style", "display",
    "visibility", "overflow", "color", "filter", "in", "in2", "stdDeviation", "result", "mode", "values",
    "type", "operator", "k1", "k2", "k3", "k4", "flood-color", "flood-opacity", "radius", "maskUnits",
    "maskContentUnits", "filterUnits", "primitiveUnits", "href", "space", "lengthAdjust", "textLength",
    "vector-effect", "shape-rendering", "text-rendering", "image-rendering", "startOffset",
}
_CSS_URL = re.compile(r"url\s*\(\s*['\"]?\s*([^)'\"]*)", re.IGNORECASE)
_CSS_BAD = re.compile(r"@import|@font-face|expression\s*\(|javascript:|behavior\s*:|-moz-binding|image-set|"
                      r"image\s*\(|cross-fade|element\s*\(|src\s*\(|\\", re.IGNORECASE)
MAX_SVG_DEPTH = 128


class UnsafeSVG(ValueError):
    """The SVG could not be parsed or rebuilt safely."""


def _css_ok(text: str) -> bool:
    if _CSS_BAD.search(text):
        return False
    return all(u.strip().startswith("#") for u in _CSS_URL.findall(text))


def _local(tag: str) -> tuple[str, str]:
    if tag.startswith("{"):
        ns, _, name = tag[1:].partition("}")
        return ns, name
    return "", tag


def _clean_svg_element(el: ET.Element) -> ET.Element | None:
    ns, name = _local(el.tag)
    if ns not in ("", SVG_NS) or name not in _SVG_ELEMENTS:
        return None
    out = ET.Element(name)
    for key, value in el.attrib.items():
        ans, aname = _local(key)
        if ans not in ("", XLINK_NS, "http://www.w3.org/XML/1998/namespace") or aname.lower().startswith("on"):
            continue
        if aname not in _SVG_ATTRIBUTES:
            continue
        if aname == "href":
            v = "".join(value.split())
            if not (v.startswith("#") or (name == "image" and _DATA_IMAGE.match(value.strip()))):
                continue
            out.set("href", value)  # SVG 2 href; xlink: dropped so no namespace games remain
            if ans == XLINK_NS:
                out.set("{%s}href" % XLINK_NS, value)
            continue
        if not _css_ok(value):
            continue
        out.set(aname if ans != "http://www.w3.org/XML/1998/namespace" else "xml:" + aname, value)
    if name == "style":
        text = el.text or ""
        if not _css_ok(text):
            return None
        out.text = text
        return out
    out.text = el.text
    for child in el:
        cleaned = _clean_svg_element(child)
        if cleaned is not None:
            cleaned.tail = child.tail
            out.append(cleaned)
        elif child.tail:  # keep text that followed a dropped element
            if len(out):
                out[-1].tail = (out[-1].tail or "") + child.tail
            else:
                out.text = (out.text or "") + child.tail
    return out


def sanitize_svg(source: str) -> str:
    """Rebuild an SVG document from an allow-list of elements and attributes; raise :class:`UnsafeSVG` when it
    cannot be parsed (DOCTYPE/entities are refused outright)."""
    if re.search(r"<!DOCTYPE|<!ENTITY", source, re.IGNORECASE):
        raise UnsafeSVG("SVG with a DOCTYPE or entity declarations")
    try:
        root = ET.fromstring(source)
    except ET.ParseError as exc:
        raise UnsafeSVG(f"SVG that does not parse ({exc})") from None
    if _local(root.tag)[1] != "svg":
        raise UnsafeSVG("SVG whose root element is not <svg>")
    stack = [(root, 1)]  # iterative depth check: the rebuild and ElementTree's serialiser recurse
    while stack:
        el, depth = stack.pop()
        if depth > MAX_SVG_DEPTH:
            raise UnsafeSVG(f"SVG nested deeper than {MAX_SVG_DEPTH} elements")
        stack.extend((child, depth + 1) for child in el)
    cleaned = _clean_svg_element(root)
    assert cleaned is not None
    cleaned.set("xmlns", SVG_NS)
    if any(k == "{%s}href" % XLINK_NS for e in cleaned.iter() for k in e.attrib):
        ET.register_namespace("xlink", XLINK_NS)
    return ET.tostring(cleaned, encoding="unicode")


# ---- LaTeX -----------------------------------------------------------------------------------------
# MathJax commands that fetch, style (CSS can fetch) or inject markup
_LATEX_BAD = re.compile(r"\\(href|url|class|cssId|style|unicode|require|html|data|bbox|mmlToken|includegraphics)"
                        r"\b", re.IGNORECASE)


# ---- policy ----------------------------------------------------------------------------------------
def _size(value: Any) -> int:
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass"))
    return len(json.dumps(value, default=str))


def note(text: str) -> str:
    """A one-line visible note as the policy writes it."""
    return f"{NOTE_PREFIX} {text}"


@dataclass
class OutputPolicy:
    """Applies the rules of this module to MIME bundles; one instance per cell budget (``new_cell`` resets it).

    ``allow_widgets`` passes ``application/vnd.jupyter.widget-view+json`` (inert JSON; without comms nothing
    renders it). ``extra_types`` names further MIME types the user vouches for (passed unchanged).
    """

    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES
    max_cell_bytes: int = DEFAULT_MAX_CELL_BYTES
    allow_widgets: bool = False
    extra_types: frozenset[str] = frozenset()
    server_origins: frozenset[str] = frozenset()
    cell_bytes: int = field(default=0, init=False)
    cell_text_truncated: bool = field(default=False, init=False)

    def new_cell(self) -> None:
        """Start a new cell's size budget (one budget, in bytes, for its text and rich outputs)."""
        self.cell_bytes = 0
        self.cell_text_truncated = False

    # -- bundles --
    def filter_bundle(self, data: Any, metadata: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """The safe version of one ``(data, metadata)`` pair of a display_data / execute_result /
        update_display_data message. Dropped or refused parts are named in a note inside ``text/plain`` (and at the
        top of ``text/html`` when one is kept), so the user sees what happened."""
        if not isinstance(data, dict):
            return {"text/plain": note("dropped an output whose data is not a MIME bundle")}, {}
        out: dict[str, Any] = {}
        notes: list[str] = []
        dropped: list[str] = []
        for mime, value in data.items():
            mime = str(mime)[:200]
            try:
                kept = self._filter_one(mime, value)
            except (UnsafeSVG, UnsafeMarkup) as exc:
                notes.append(f"dropped {mime}: {exc}")
                continue
            except Exception as exc:  # noqa: BLE001 (no guest bundle may break the policy: drop it, say so)
                notes.append(f"dropped {mime}: it could not be sanitized ({type(exc).__name__})")
                continue
            if kept is None:
                dropped.append(mime)
                continue
            out[kept[0]] = kept[1]
        if dropped:
            names = ", ".join(sorted(set(dropped)))
            notes.append(f"dropped output type(s) that could run code or are not on the allow-list: {names}")
            if WIDGET_MIME in dropped:
                notes.append("ipywidgets do not work in the sandbox: a widget needs a live channel from the guest to "
                             "your browser, which the sandbox does not open; show plain output (print, display of "
                             "a table or plot), or run widgets in a local kernel")
        size = sum(_size(v) for v in out.values())
        if size > self.max_output_bytes:
            notes.append(f"dropped an output of {size} bytes (limit {self.max_output_bytes} per output)")
            out = {"text/plain": _truncate(out.get("text/plain", ""), 2000)} if "text/plain" in out else {}
            size = sum(_size(v) for v in out.values())
        if self.cell_bytes + size > self.max_cell_bytes:
            notes.append(f"dropped an output of {size} bytes: this cell's outputs passed "
                         f"{self.max_cell_bytes} bytes")
            out = {}
            size = 0
        self.cell_bytes += size
        if notes:
            text = "\n".join(note(n) for n in notes)
            plain = out.get("text/plain")
            out["text/plain"] = text + ("\n" + plain if isinstance(plain, str) and plain else "")
            if "text/html" in out:
                out["text/html"] = f"<pre>{html.escape(text)}</pre>" + out["text/html"]
        return out, (self.filter_metadata(metadata, out) if out else {})

    def _filter_one(self, mime: str, value: Any) -> tuple[str, Any] | None:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):  # nbformat's multiline strings
            value = "".join(value)
        if mime in self.extra_types:
            return mime, value
        if mime == WIDGET_VIEW and self.allow_widgets and isinstance(value, dict):
            return mime, {k: value[k] for k in ("model_id", "version_major", "version_minor") if k in value}
        if mime not in SAFE_TYPES:
            return None
        if mime == "application/json":
            return (mime, value) if _size(value) <= MAX_TEXT_CHARS else None
        if not isinstance(value, str):
            return None
        if mime == "text/plain":
            return mime, _truncate(value, MAX_TEXT_CHARS)
        if mime == "text/html":
            return mime, sanitize_html(value, self.server_origins)
        if mime == "text/markdown":
            return "text/html", markdown_to_safe_html(value, self.server_origins)
        if mime == "image/svg+xml":
            return mime, sanitize_svg(value)
        if mime == "text/latex":
            return (mime, value) if not _LATEX_BAD.search(value) else None
        if mime in RASTER_TYPES:
            try:
                base64.b64decode("".join(value.split()), validate=True)
            except (binascii.Error, ValueError):
                return None
            return mime, value
        return None

    @staticmethod
    def filter_metadata(metadata: Any, data: dict[str, Any]) -> dict[str, Any]:
        """Keep only harmless presentation hints for the MIME types that survived."""
        if not isinstance(metadata, dict):
            return {}
        out: dict[str, Any] = {}
        for mime in data:
            m = metadata.get(mime)
            if not isinstance(m, dict):
                continue
            kept: dict[str, Any] = {}
            for key in ("width", "height"):
                if isinstance(m.get(key), (int, float)) and not isinstance(m.get(key), bool) and 0 < m[key] < 1e5:
                    kept[key] = m[key]
            if m.get("unconfined") is True:
                kept["unconfined"] = True
            if mime == "application/json" and isinstance(m.get("expanded"), bool):
                kept["expanded"] = m["expanded"]
            if m.get("isolated") is True:
                kept["isolated"] = True
            if kept:
                out[mime] = kept
        if metadata.get("isolated") is True:
            out["isolated"] = True
        return out if _size(out) <= MAX_METADATA_BYTES else {}

    # -- whole iopub messages (content dicts) --
    def filter_content(self, msg_type: str, content: Any) -> dict[str, Any] | None:
        """The safe content of one iopub message, or None to drop the message. Handles display_data,
        execute_result, update_display_data, stream, error, clear_output, status, execute_input; comm
        messages and anything else are dropped. Never raises: a message that breaks a rule's code is dropped
        (a display message becomes a note saying so)."""
        if not isinstance(content, dict):
            return None
        try:
            return self._filter_content(msg_type, content)
        except Exception as exc:  # noqa: BLE001
            if msg_type in ("display_data", "execute_result", "update_display_data"):
                return {"data": {"text/plain": note(f"dropped an output that could not be sanitized "
                                                    f"({type(exc).__name__})")}, "metadata": {}}
            return None

    def _text_budget(self, text: str) -> str | None:
        """``text`` as far as this cell's byte budget allows: past it once a truncation note, then None."""
        size = len(text.encode("utf-8", "surrogatepass"))
        if self.cell_bytes + size <= self.max_cell_bytes:
            self.cell_bytes += size
            return text
        if self.cell_text_truncated:
            return None
        self.cell_text_truncated = True
        room = max(0, self.max_cell_bytes - self.cell_bytes)
        self.cell_bytes = self.max_cell_bytes
        head = text.encode("utf-8", "surrogatepass")[:room].decode("utf-8", "ignore")
        return head + "\n" + note(f"output truncated: this cell's output passed {self.max_cell_bytes} bytes; "
                                   f"the rest of its text is dropped")

    def _filter_content(self, msg_type: str, content: dict[str, Any]) -> dict[str, Any] | None:
        if msg_type in ("display_data", "execute_result", "update_display_data"):
            data, metadata = self.filter_bundle(content.get("data"), content.get("metadata"))
            new: dict[str, Any] = {"data": data, "metadata": metadata}
            transient = content.get("transient")
            if isinstance(transient, dict) and isinstance(transient.get("display_id"), str):
                new["transient"] = {"display_id": transient["display_id"][:200]}
            if msg_type == "execute_result":
                new["execution_count"] = _int_or_none(content.get("execution_count"))
            return new
        if msg_type == "stream":
            name = content.get("name") if content.get("name") in ("stdout", "stderr") else "stdout"
            text = self._text_budget(_truncate(_text(content.get("text")), MAX_TEXT_CHARS))
            return None if text is None else {"name": name, "text": text}
        if msg_type == "error":
            tb = content.get("traceback")
            tb = [_truncate(_text(line), 64 * KiB) for line in tb[:500]] if isinstance(tb, list) else []
            return {"ename": _truncate(_text(content.get("ename")), 500),
                    "evalue": _truncate(_text(content.get("evalue")), 64 * KiB), "traceback": tb}
        if msg_type == "clear_output":
            return {"wait": bool(content.get("wait"))}
        if msg_type == "status":
            state = content.get("execution_state")
            return {"execution_state": state} if state in ("busy", "idle", "starting") else None
        if msg_type == "execute_input":
            return {"code": _truncate(_text(content.get("code")), MAX_TEXT_CHARS),
                    "execution_count": _int_or_none(content.get("execution_count"))}
        return None


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ("" if value is None else str(value))


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + "\n" + note(f"output truncated at {limit} characters")
