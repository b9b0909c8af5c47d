"""Search as a service: clip-retrieval's JSON API, a search page, health and Prometheus metrics.

`create_app(index_dir, encoders)` builds the Flask application (tests call it directly; app.py, its routes a
table); `run_server(app)` serves it with waitress within bounds on slow clients (server.py); `openalign serve`
does both. service.py answers the requests that request_checks.py has checked; limits.py holds the bounds;
hosts.py is the Host header check against DNS rebinding; dedup.py clip-retrieval's deduplication;
access_log.py the Common Log Format.

The names below are loaded on first use, so that reading the limits (as the command line does for its defaults)
does not load the model and index code.
"""

import importlib

_EXPORTS = {
    "AllowedHosts": "openalign.serve.hosts",
    "RequestError": "openalign.serve.request_checks",
    "SearchService": "openalign.serve.service",
    "ServeLimits": "openalign.serve.limits",
    "ServerStartError": "openalign.serve.service",
    "create_app": "openalign.serve.app",
    "load_indexes": "openalign.serve.service",
    "run_server": "openalign.serve.server",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'openalign.serve' has no attribute {name!r}")
