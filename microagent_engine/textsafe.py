"""Guest-supplied text made safe to store and show.

Everything a guest says about itself (agent version, kernel release, error texts, exit messages, console
lines quoted in an error) is attacker-controlled. It passes through :func:`safe_text` once, where it enters the
state record or a result, so that no terminal escape sequence, bidi override or unbounded string reaches a
terminal, a log viewer or an HTML page (HTML escaping of ``<>&`` stays the renderer's job).
"""

from __future__ import annotations

import unicodedata

#: default bound for one guest-supplied field (characters, before escaping)
FIELD_LIMIT = 256


def _escape(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _unsafe(ch: str, newlines: bool) -> bool:
    if newlines and ch in "\n\t":
        return False
    # Cc: C0/C1 controls and DEL; Cf: bidi overrides, zero-width joiners; Zl/Zp: line/paragraph separators
    return unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn")


def safe_text(value: str | bytes, limit: int = FIELD_LIMIT, *, newlines: bool = False) -> str:
    """``value`` with control and format characters escaped (``\\x1b``, ``\\u202e``) and at most ``limit``
    characters kept (a ``…[+N chars]`` suffix says how many were cut). ``newlines`` keeps ``\\n`` and ``\\t``
    (for multi-line error texts); otherwise they are escaped too. Bytes are decoded as UTF-8 with replacement."""
    text = value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
    cut = len(text) - limit
    if cut > 0:
        text = text[:limit]
    out = "".join(_escape(ch) if _unsafe(ch, newlines) else ch for ch in text)
    return out + (f"…[+{cut} chars]" if cut > 0 else "")
