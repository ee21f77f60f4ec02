"""Which response header fields an app may send: RFC 9110, 5.1 and 5.5.

A field name is a token; a value holds no control character but tab. CR or LF
would split the response (a second response, or a header the app never meant,
for whatever reads it); the other control characters are refused by uvicorn's
httptools protocol and by most clients. ``serve_asyncio`` and ``serve_wsgi``
answer an app that sets such a field with a 500 and a log record naming it
(waitress itself refuses only CR and LF).
"""

from __future__ import annotations

import re

_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_IN_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def forbidden(name: str, value: str) -> bool:
    """Whether an app's response field ``name: value`` must not be sent."""
    return _NAME.fullmatch(name) is None or _BAD_IN_VALUE.search(value) is not None
