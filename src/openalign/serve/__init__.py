"""Search as a service: clip-retrieval's JSON API, a search page, health and Prometheus metrics.

`create_app(index_dir, encoders)` builds the Flask application (tests call it directly; app.py, its routes a
table); `run_server(app)` serves it with waitress within bounds on slow clients (server.py); `openalign serve`
does both. service.py answers the requests that request_checks.py has checked; hosts.py is the Host header
check against DNS rebinding; dedup.py clip-retrieval's deduplication; access_log.py the Common Log Format.
"""

from openalign.serve.app import create_app
from openalign.serve.hosts import AllowedHosts
from openalign.serve.request_checks import RequestError
from openalign.serve.server import run_server
from openalign.serve.service import SearchService, ServeLimits, ServerStartError, load_indexes

__all__ = ["AllowedHosts", "RequestError", "SearchService", "ServeLimits", "ServerStartError", "create_app",
           "load_indexes", "run_server"]
