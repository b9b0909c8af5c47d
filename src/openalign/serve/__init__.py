"""Search as a service: clip-retrieval's JSON API, a search page, health and Prometheus metrics.

`create_app(index_dir, encoders)` builds the Flask application (tests call it directly); `run_server(app)`
serves it with waitress; `openalign serve` does both. See app.py for the routes and service.py for the checks.
"""

from openalign.serve.app import create_app, run_server
from openalign.serve.service import RequestError, SearchService, ServeLimits, load_indexes

__all__ = ["RequestError", "SearchService", "ServeLimits", "create_app", "load_indexes", "run_server"]
