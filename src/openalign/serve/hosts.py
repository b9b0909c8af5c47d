"""The host names `openalign serve` answers to, against DNS rebinding.

A web page can make its own host name resolve to 127.0.0.1 and then read a loopback server as if it were its
own origin; the one thing it cannot change is the Host header, which still names the page's host. So the server
answers only Host headers that name it: the loopback names and the address it was told to listen on, on its own
port, plus the names a deployment adds (--allowed-hosts, e.g. the name a reverse proxy is reached by). The same
list decides which pages may POST to it (their Origin header).
"""

from __future__ import annotations

from urllib.parse import urlsplit

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


def _split(host: str) -> tuple[str, str | None]:
    """("name", "port" or None) of a Host header value or an --allowed-hosts entry; IPv6 in brackets."""
    host = host.strip().lower()
    if host.count(":") > 1 and not host.startswith("["):  # a bare IPv6 address, as --host takes it
        return f"[{host}]", None
    if host.startswith("["):
        name, _, rest = host.partition("]")
        return name + "]", rest[1:] if rest.startswith(":") and len(rest) > 1 else None
    name, _, port = host.partition(":")
    return name, port or None


class AllowedHosts:
    """Host names, each with an optional port. A name given without one matches a Host header that names no
    port or the server's own port; one given with a port matches that port only (a proxy's public port)."""

    def __init__(self, names=()):
        self.entries = tuple(dict.fromkeys(_split(name) for name in (*LOOPBACK_NAMES, *names) if name.strip()))

    def allows(self, host: str, server_port: str | None) -> bool:
        """Whether a request whose Host header is host, received on server_port, names this server."""
        name, port = _split(host)
        for allowed_name, allowed_port in self.entries:
            if name != allowed_name:
                continue
            if (port == allowed_port) if allowed_port else port in (None, server_port):
                return True
        return False

    def allows_origin(self, origin: str, server_port: str | None) -> bool:
        """Whether a page of origin (scheme://host[:port], or "null") may send requests to this server."""
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and bool(parts.netloc) and self.allows(parts.netloc, server_port)

    def describe(self) -> str:
        """The entries as a person would write them."""
        return ", ".join(f"{name}:{port}" if port else name for name, port in self.entries)
