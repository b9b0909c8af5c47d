"""Search as a service: clip-retrieval's JSON API, a search page, health and Prometheus metrics.

`create_app(index_dir, encoders)` builds the Flask application (tests call it directly; app.py, its routes a
table); `run_server(app)` serves it with waitress within bounds on slow clients (server.py); `openalign serve`
does both. service.py answers the requests that request_checks.py has checked; limits.py holds the bounds;
hosts.py is the Host header check against DNS rebinding; dedup.py clip-retrieval's deduplication;
access_log.py the Common Log Format.

The names below are loaded on first use, so that reading the limits (as the command line does for its defaults)
does not load the model and index code.
"""

from openalign.lazy_exports import lazy_getattr

# Each module and the public names it defines.
_EXPORTS = {name: module for module, names in (
    ("openalign.serve.app", ("create_app",)),
    ("openalign.serve.hosts", ("AllowedHosts",)),
    ("openalign.serve.limits", ("ServeLimits",)),
    ("openalign.serve.request_checks", ("RequestError",)),
    ("openalign.serve.server", ("run_server",)),
    ("openalign.serve.service", ("SearchService", "ServerStartError", "load_indexes")),
) for name in names}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
