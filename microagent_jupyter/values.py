"""Values in and out of a guest Python session, without ever unpickling or eval'ing guest bytes on the host.

Formats (the ``format`` field of a transfer):

* ``json``: plain data — dict (str keys), list, tuple (arrives as a list), str, int, float, bool, None.
* ``npy``: a numpy array in numpy's ``.npy`` format, read with ``allow_pickle=False`` (object arrays refused).
* ``pandas-table-json``: a pandas DataFrame as ``DataFrame.to_json(orient="table")`` (JSON Table Schema with the
  dtypes), read with ``pandas.read_json(..., orient="table")``. Arrow IPC/Parquet would be the first choice, but
  Debian 12 (the built-in Python image's base) ships no ``python3-pyarrow`` (``apt-cache policy python3-pyarrow``
  finds nothing), so the guest could not write it; the table JSON is parsed as JSON, never executed.
* ``pandas-series-table-json``: a pandas Series, the same as a one-column DataFrame (named after the Series).

Anything else is refused with a message naming the type. The guest half is :data:`GUEST_CODE`, run once in the
guest kernel; it answers ``--out`` with a display message of MIME type :data:`VALUE_MIME` that the host reads
(and never shows): ``{"name", "format", "data"}`` with ``data`` base64 for ``npy`` and text otherwise, or
``{"name", "format": "refused", "type"}``. The host trusts none of it: an unknown format — ``pickle`` included —
is refused, and each known format is parsed by a parser that cannot run code.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from typing import Any

from microagent_engine.errors import InvalidArgument, MicroagentError

VALUE_MIME = "application/vnd.microagent.value+json"
FORMATS = ("json", "npy", "pandas-table-json", "pandas-series-table-json")
MAX_VALUE_BYTES = 256 * 1024 * 1024  # one value either way
_JSON_DEPTH = 100
MAX_NPY_ELEMENTS = 2**31  # elements of one array (zero-size dtypes such as |V0 declare any count for free)
_NPY_MAX_HEADER = 64 * 1024


class ValueRefused(MicroagentError):
    """A value cannot cross the sandbox boundary in a safe format (or the guest sent one that is not)."""


def _is_plain(value: Any, depth: int = 0) -> bool:
    if depth > _JSON_DEPTH:
        return False
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, float):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v, depth + 1) for k, v in value.items())
    return False


def _type_name(value: Any) -> str:
    t = type(value)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def encode(value: Any) -> tuple[str, str]:
    """``(format, data)`` of a host value for ``--in``: ``data`` is text (base64 for ``npy``).
    Raises :class:`ValueRefused` naming the type when no safe format carries it."""
    mod = type(value).__module__.split(".")[0]
    if mod == "numpy" and type(value).__name__ == "ndarray":
        import numpy as np

        if value.dtype.hasobject:
            raise ValueRefused(f"a numpy array of dtype {value.dtype} holds Python objects and cannot be sent "
                               f"without pickle; convert it (e.g. .astype(str)) first")
        buf = io.BytesIO()
        np.save(buf, value, allow_pickle=False)
        return "npy", base64.b64encode(buf.getvalue()).decode()
    if mod == "pandas" and type(value).__name__ == "DataFrame":
        return "pandas-table-json", value.to_json(orient="table")
    if mod == "pandas" and type(value).__name__ == "Series":
        return "pandas-series-table-json", _series_frame(value).to_json(orient="table")
    if _is_plain(value):
        return "json", json.dumps(value, allow_nan=True)
    raise ValueRefused(f"cannot send a value of type {_type_name(value)}: only plain data (dict, list, str, int, "
                       f"float, bool, None), numpy arrays and pandas DataFrames and Series cross the sandbox")


def decode(payload: Any) -> Any:
    """The host value of one transfer payload from the guest. Refuses (``ValueRefused``) any format other than
    :data:`FORMATS` and any data that does not parse as its format; never unpickles or evals."""
    if not isinstance(payload, dict):
        raise ValueRefused("the guest sent a value transfer that is not a JSON object; refused")
    name = str(payload.get("name", "?"))[:100]
    fmt = payload.get("format")
    data = payload.get("data")
    if fmt == "refused":
        raise ValueRefused(f"cannot bring {name!r} back: its type {str(payload.get('type'))[:200]} has no safe "
                           f"format (plain data, numpy arrays and pandas DataFrames do)")
    if fmt not in FORMATS:
        raise ValueRefused(f"the guest sent {name!r} in format {str(fmt)[:50]!r}, which is not one of "
                           f"{', '.join(FORMATS)}; refused (guest bytes are never unpickled or evaluated)")
    if not isinstance(data, str):
        raise ValueRefused(f"the guest sent {name!r} without text data; refused")
    if len(data) > MAX_VALUE_BYTES * 4 // 3 + 4:
        raise ValueRefused(f"{name!r} is larger than {MAX_VALUE_BYTES} bytes; refused")
    try:
        if fmt == "json":
            return json.loads(data)
        if fmt == "npy":
            import numpy as np

            raw = base64.b64decode(data, validate=True)
            check_npy_size(raw, name)
            return np.load(io.BytesIO(raw), allow_pickle=False)
        import pandas as pd

        json.loads(data)  # must be plain JSON before pandas sees it
        frame = pd.read_json(io.StringIO(data), orient="table")
        if fmt == "pandas-series-table-json":
            if frame.shape[1] != 1:
                raise ValueError(f"a Series arrives as one column, got {frame.shape[1]}")
            series = frame.iloc[:, 0]
            return series.rename(None) if series.name == SERIES_COLUMN else series
        return frame
    except ImportError as exc:
        raise ValueRefused(f"cannot read {name!r} ({fmt}) on the host: {exc.name} is not installed here; "
                           f"pip install {exc.name}") from None
    except (ValueError, TypeError, KeyError, binascii.Error, OSError, RecursionError) as exc:
        raise ValueRefused(f"the guest's {name!r} is not valid {fmt} ({type(exc).__name__}: "
                           f"{str(exc)[:200]}); refused") from None


#: the column a Series without a name travels in (``_series_frame``)
SERIES_COLUMN = "__microagent_series__"


def _series_frame(series: Any) -> Any:
    """A Series as a one-column DataFrame (JSON Table Schema carries frames; the column keeps its name)."""
    return series.to_frame(SERIES_COLUMN if series.name is None else series.name)


def check_npy_size(raw: bytes, name: str = "value") -> None:
    """Refuse an ``.npy`` payload by its *declared* size before numpy allocates anything: the header's dtype and
    shape must describe at most :data:`MAX_VALUE_BYTES` and :data:`MAX_NPY_ELEMENTS`, no object fields, and exactly
    the bytes that follow the header (computed with Python integers: no overflow)."""
    import numpy as np
    from numpy.lib import format as npy

    buf = io.BytesIO(raw)
    try:
        version = npy.read_magic(buf)
        if version == (1, 0):
            shape, fortran, dtype = npy.read_array_header_1_0(buf, max_header_size=_NPY_MAX_HEADER)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = npy.read_array_header_2_0(buf, max_header_size=_NPY_MAX_HEADER)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except (ValueError, TypeError, SyntaxError, OverflowError) as exc:
        raise ValueRefused(f"the guest's {name!r} is not valid npy (header: {str(exc)[:200]}); refused") from None
    if dtype.hasobject:
        raise ValueRefused(f"the guest's {name!r} is not valid npy (an array of Python objects, {dtype}, "
                           f"would need pickle); refused")
    count = 1
    for n in shape:
        if not isinstance(n, int) or n < 0:
            raise ValueRefused(f"the guest's {name!r} is not valid npy (shape {shape!r}); refused")
        count *= n
    size = count * dtype.itemsize
    if count > MAX_NPY_ELEMENTS or size > MAX_VALUE_BYTES:
        raise ValueRefused(f"the guest's {name!r} declares {count} elements of {dtype.itemsize} bytes "
                           f"(shape {tuple(shape)}, dtype {np.dtype(dtype).str}): more than the limit of "
                           f"{MAX_NPY_ELEMENTS} elements / {MAX_VALUE_BYTES} bytes; refused")
    if len(raw) - buf.tell() != size:
        raise ValueRefused(f"the guest's {name!r} is not valid npy (it declares {size} bytes of data but carries "
                           f"{len(raw) - buf.tell()}); refused")


def check_names(names: list[str]) -> list[str]:
    """Identifiers for ``--in``/``--out`` (refuses anything else: the names are spliced into guest code)."""
    for n in names:
        if not n.isidentifier():
            raise InvalidArgument(f"{n!r} is not a Python variable name")
    return names


def put_code(name: str, value: Any) -> str:
    """Guest code that binds ``name`` to ``value`` (encoded here; decoded in the guest by :data:`GUEST_CODE`)."""
    fmt, data = encode(value)
    return f"__import__('_microagent_values').put({name!r}, {fmt!r}, {data!r}, globals())"


def get_code(name: str) -> str:
    """Guest code that publishes ``name``'s value as a :data:`VALUE_MIME` display message."""
    return f"__import__('_microagent_values').get({name!r}, globals())"


_GUEST_MODULE = r"""
import base64, io, json
MIME = "__MIME__"
SERIES = "__SERIES__"

def _is_plain(v, d=0):
    if d > 100: return False
    if v is None or isinstance(v, (bool, int, float, str)): return True
    if isinstance(v, (list, tuple)): return all(_is_plain(x, d + 1) for x in v)
    if isinstance(v, dict): return all(isinstance(k, str) and _is_plain(x, d + 1) for k, x in v.items())
    return False

def put(name, fmt, data, ns):
    if fmt == "json":
        ns[name] = json.loads(data)
    elif fmt == "npy":
        import numpy as np
        ns[name] = np.load(io.BytesIO(base64.b64decode(data)), allow_pickle=False)
    elif fmt in ("pandas-table-json", "pandas-series-table-json"):
        import pandas as pd
        frame = pd.read_json(io.StringIO(data), orient="table")
        if fmt == "pandas-series-table-json":
            frame = frame.iloc[:, 0]
            frame = frame.rename(None) if frame.name == SERIES else frame
        ns[name] = frame
    else:
        raise ValueError("unknown format %r" % (fmt,))

def encode(name, v):
    t = type(v)
    top = t.__module__.split(".")[0]
    if top == "numpy" and t.__name__ == "ndarray" and not v.dtype.hasobject:
        import numpy as np
        buf = io.BytesIO(); np.save(buf, v, allow_pickle=False)
        return {"name": name, "format": "npy", "data": base64.b64encode(buf.getvalue()).decode()}
    if top == "pandas" and t.__name__ == "DataFrame":
        return {"name": name, "format": "pandas-table-json", "data": v.to_json(orient="table")}
    if top == "pandas" and t.__name__ == "Series":
        frame = v.to_frame(SERIES if v.name is None else v.name)
        return {"name": name, "format": "pandas-series-table-json", "data": frame.to_json(orient="table")}
    if _is_plain(v):
        return {"name": name, "format": "json", "data": json.dumps(v)}
    tn = t.__name__ if t.__module__ == "builtins" else t.__module__ + "." + t.__qualname__
    return {"name": name, "format": "refused", "type": tn}

def get(name, ns):
    from IPython.display import publish_display_data
    if name not in ns:
        raise NameError("name %r is not defined in the session" % (name,))
    publish_display_data({MIME: encode(name, ns[name])})
""".replace("__MIME__", VALUE_MIME).replace("__SERIES__", SERIES_COLUMN)

#: Run once in the guest kernel per session: installs module ``_microagent_values`` (put/get/encode).
GUEST_CODE = (f"import sys as _s, types as _t\n_m = _t.ModuleType('_microagent_values')\n"
              f"exec({_GUEST_MODULE!r}, _m.__dict__)\n_s.modules['_microagent_values'] = _m\ndel _s, _t, _m\n")
