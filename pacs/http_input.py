"""Values taken from HTTP requests, read the same way by every route."""

from __future__ import annotations

import json
import re
from typing import Any

_WHOLE_NUMBER = re.compile(r"[0-9]{1,19}")


def whole_number(text: str | None) -> int | None:
    """``text`` as a whole number written with the ASCII digits 0-9 (at most 19 of them), else
    None. ``int()`` and ``str.isdigit()`` also take other scripts' digits (full-width ``１``),
    signs, spaces and underscores; a number in a URL is none of those."""
    return int(text) if text is not None and _WHOLE_NUMBER.fullmatch(text) else None


def parse_json(raw: bytes) -> Any:
    """A request body as JSON; ``ValueError`` saying why when it is not JSON we can read
    (nesting deeper than the parser recurses raises RecursionError, not ValueError)."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("the body is not valid JSON: nested too deeply") from None
    except ValueError:  # UnicodeDecodeError too
        raise ValueError("the body is not valid JSON") from None
