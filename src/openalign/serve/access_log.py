"""The access log of `openalign serve`: one line per request in the Common Log Format, which log analysers,
fail2ban and people read:

    127.0.0.1 - - [06/Dec/2026:14:03:11 +0000] "POST /knn-service HTTP/1.1" 200 5121

A WSGI middleware, so it sees what waitress answered whatever the route; the line is written when the response
is finished (its size known). Anything in the request line that is not printable ASCII is written as \\xHH, so
a request cannot forge a line of the log.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from urllib.parse import quote


def _printable(text: str) -> str:
    return "".join(c if " " <= c < "\x7f" and c not in '"\\' else f"\\x{ord(c) & 0xFF:02x}" for c in text)


def common_log_line(environ: dict, received: float, status: str, size: int) -> str:
    """The Common Log Format line of a request received at `received` (seconds since the epoch)."""
    target = environ.get("REQUEST_URI") or (
        quote(environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", ""))
        + (f"?{environ['QUERY_STRING']}" if environ.get("QUERY_STRING") else "")
    )
    request = f"{environ.get('REQUEST_METHOD', '-')} {target} {environ.get('SERVER_PROTOCOL', '-')}"
    when = time.strftime("%d/%b/%Y:%H:%M:%S %z", time.localtime(received))
    user = environ.get("REMOTE_USER") or "-"
    return (f"{environ.get('REMOTE_ADDR', '-')} - {_printable(user)} [{when}] \"{_printable(request)}\" {status} "
            f"{size or '-'}")


class AccessLog:
    """WSGI middleware calling write(line) once per request, when its response is finished."""

    def __init__(self, application, write: Callable[[str], None]):
        self.application = application
        self.write = write

    def __call__(self, environ, start_response):
        received = time.time()
        status = ["-"]

        def recording_start_response(status_line, headers, exc_info=None):
            status[0] = status_line.split(" ", 1)[0]
            return start_response(status_line, headers, exc_info)

        body = self.application(environ, recording_start_response)
        return _CountedBody(body, lambda size: self.write(common_log_line(environ, received, status[0], size)))


class _CountedBody:
    """A response body that counts the bytes sent and reports the count when the server closes it."""

    def __init__(self, body: Iterable[bytes], finished: Callable[[int], None]):
        self.body = body
        self.finished = finished
        self.size = 0

    def __iter__(self):
        for chunk in self.body:
            self.size += len(chunk)
            yield chunk

    def close(self) -> None:
        try:
            close = getattr(self.body, "close", None)
            if close is not None:
                close()
        finally:
            self.finished(self.size)
