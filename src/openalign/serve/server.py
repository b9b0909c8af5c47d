"""Serving the application with waitress, within bounds a slow or hostile client cannot stretch.

waitress bounds the body size, the header size, the number of open connections and the time a connection may
sit idle. A connection that trickles its request (one header byte every few seconds) is not idle, so waitress
alone lets 256 such clients hold every connection slot and nobody else is answered. Here every request must
arrive whole within `request_seconds` of its first byte, or its connection is closed: a slot held by a slow
client is freed within that time. What a public deployment needs in front (TLS, authentication, rates and
connections per client) is in docs/search.md.
"""

from __future__ import annotations

import ipaddress
import logging
import time

from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser

from openalign.serve.access_log import AccessLog
from openalign.serve.limits import CONNECTION_LIMIT, IDLE_SECONDS, REQUEST_SECONDS
from openalign.serve.service import ServerStartError

LOGGER = logging.getLogger("openalign.serve")


def is_loopback(host: str) -> bool:
    """Whether host only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _TimedParser(HTTPRequestParser):
    """waitress's request parser, remembering when the request's first byte arrived."""

    def __init__(self, adjustments):
        super().__init__(adjustments)
        self.started = time.time()


class _TimedChannel(HTTPChannel):
    parser_class = _TimedParser


def _close_slow_requests(server, request_seconds: float) -> None:
    """Extend the server's periodic check of idle connections to close those whose request has been arriving
    for longer than request_seconds. It runs in waitress's main loop, the thread that reads every channel."""
    close_idle = server.maintenance

    def maintenance(now: float) -> None:
        close_idle(now)
        cutoff = now - request_seconds
        for channel in list(server.active_channels.values()):
            request = channel.request
            if request is not None and not request.completed and request.started < cutoff:
                channel.will_close = True  # waitress closes it on its next turn

    server.maintenance = maintenance


def run_server(
    app,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    threads: int = 8,
    connection_limit: int = CONNECTION_LIMIT,
    request_seconds: float = REQUEST_SECONDS,
    access_log=None,
    announce=print,
) -> None:
    """Serve app with waitress until interrupted; announce("... http://HOST:PORT") once listening (port 0
    picks a free port, and the announcement names it). access_log: a callable given one Common Log Format line
    per request, or None."""
    from waitress import create_server

    service = app.extensions["openalign_service"]
    if not is_loopback(host):
        LOGGER.warning(
            "listening on %s: the server is reachable from other machines; it has no authentication", host
        )
    try:  # one query uses one FAISS thread; concurrency comes from the request threads
        import faiss

        faiss.omp_set_num_threads(1)
    except ImportError:
        pass
    application = app if access_log is None else AccessLog(app, access_log)
    try:
        server = create_server(
            application,
            host=host,
            port=port,
            threads=threads,
            # Waitress reads a body (spooled to a temporary file past 512 KB) before the application sees it,
            # and cuts the connection of one over its own limit mid-upload. Up to twice the limit the body is
            # read and Flask answers 413 with a message the client can show; beyond, the connection is cut.
            max_request_body_size=2 * service.limits.max_body_bytes,
            channel_timeout=IDLE_SECONDS,
            connection_limit=connection_limit,
            cleanup_interval=1,  # the slow-request check's period, in seconds
            ident="openalign",
        )
    except OSError as error:
        raise ServerStartError(f"cannot listen on {host}:{port} ({error})") from error
    server.channel_class = _TimedChannel
    _close_slow_requests(server, request_seconds)
    announce(f"openalign serve: {service.name} on http://{host}:{server.effective_port}")
    try:
        server.run()
    finally:
        server.close()
