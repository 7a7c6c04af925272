"""JSON from untrusted bytes, with its size and nesting depth bounded before anything parses it.

``json.loads`` recurses once per nesting level: ``[`` * 100000 raises ``RecursionError`` (or, on a
thread with a small stack, worse), and a document nested a few hundred deep parses but breaks the
code that walks it afterwards. So the depth is measured first by a byte scan that never recurses:
string literals are cut out (brackets inside strings do not nest), the brackets that remain are
summed in chunks with numpy. Documents with fewer opening brackets than the bound skip the scan.
``RecursionError`` is still caught, as a last resort only.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

# A string literal, or the unterminated tail of one (so an odd quote never makes the scan quadratic).
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_OPENERS = np.zeros(256, dtype=np.int8)
_OPENERS[list(b"[{")] = 1
_OPENERS[list(b"]}")] = -1
_CHUNK = 1 << 20
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class JsonBound(ValueError):
    """A document over a bound; ``reason`` is the ledger reason (``json too deep``/``json too large``)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def nesting_depth(data: bytes) -> int:
    """The deepest bracket nesting of a JSON text, ignoring brackets inside strings; never recurses."""
    brackets = _STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    view = np.frombuffer(brackets, dtype=np.uint8)
    depth = deepest = 0
    for start in range(0, len(view), _CHUNK):  # chunks keep the int64 running sums small
        steps = _OPENERS[view[start : start + _CHUNK]]
        running = np.cumsum(steps, dtype=np.int64) + depth
        deepest = max(deepest, int(running.max()))
        depth = int(running[-1])
    return deepest


def check(data: bytes, max_depth: int | None, max_bytes: int | None) -> None:
    """Raise ``JsonBound`` when ``data`` is larger than ``max_bytes`` or nests deeper than ``max_depth``."""
    if max_bytes is not None and len(data) > max_bytes:
        raise JsonBound("json too large", f"{len(data)} bytes, over {max_bytes}")
    if max_depth is None or data.count(b"[") + data.count(b"{") <= max_depth:
        return
    depth = nesting_depth(data)
    if depth > max_depth:
        raise JsonBound("json too deep", f"nesting {depth}, over {max_depth}")


def loads(data: bytes | str, max_depth: int | None, max_bytes: int | None) -> Any:
    """``json.loads`` after ``check``; raises ``JsonBound``, ``UnicodeDecodeError`` or ``json.JSONDecodeError``."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    check(raw, max_depth, max_bytes)
    text = raw.decode("utf-8")
    try:
        value = json.loads(text)
    except RecursionError as e:  # the scan above should make this unreachable; never let it escape
        raise JsonBound("json too deep", "recursion limit") from e
    except json.JSONDecodeError:
        raise
    except ValueError as e:  # an integer of over 4300 digits: Python refuses to convert it (a CPU bomb)
        raise JsonBound("json number too large", str(e)[:120]) from e
    if _SURROGATE_ESCAPE.search(raw):  # rare: only then pay for a second pass
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:  # "\ud800" alone is valid JSON but no text: Arrow and UTF-8 refuse it
            raise JsonBound("json has invalid unicode", f"lone surrogate escape: {e.reason}") from e
    return value
