"""The web layer of `openalign serve`: a Flask application over a SearchService, its routes a table (ROUTES).

The routes are clip-retrieval's back end's, so that its `ClipClient` and front end work unchanged, plus
openalign's page, thumbnails, health and metrics. A refused request gets {"error": message} with a 4xx status
(503 when the server is busy with images); an unexpected failure is logged and answered 500, and the server
goes on serving.

Every request must name this server in its Host header (hosts.py): a web page cannot reach a loopback server
through a DNS name it controls. A POST body is JSON: sent with Content-Type application/json, or with none
(clip-retrieval's ClipClient sends none); a form or text/plain body, which any web page can send to any
address, is refused 415, and so is a POST from a page of another origin (403).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from flask import Flask, Response, jsonify, request, send_from_directory
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from werkzeug.exceptions import HTTPException

from openalign.serve.hosts import AllowedHosts
from openalign.serve.limits import ServeLimits
from openalign.serve.request_checks import RequestError, parse_body
from openalign.serve.service import SearchService, load_indexes

LOGGER = logging.getLogger("openalign.serve")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SECURITY_HEADERS = {
    # The page loads nothing from elsewhere; say so to the browser too.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'",
    "X-Content-Type-Options": "nosniff",
}


def _metrics(registry):
    return {
        "queries": Counter("openalign_queries", "Searches answered", ["modality", "query"], registry=registry),
        "latency": Histogram(
            "openalign_query_latency_seconds", "Time to answer a search", ["query"], buckets=LATENCY_BUCKETS,
            registry=registry,
        ),
        "refused": Counter("openalign_refused_requests", "Requests answered 4xx or 5xx", ["status"], registry=registry),
    }


def _query_kind(body) -> str:
    for name, kind in (("text", "text"), ("image", "image"), ("embedding_input", "embedding"), ("id", "id")):
        if isinstance(body, dict) and body.get(name) not in (None, ""):
            return kind
    return "none"


class Handlers:
    """What each route does, over one service, its metrics and the page's files."""

    def __init__(self, service: SearchService, static_folder):
        self.service = service
        self.static_folder = static_folder
        self.registry = CollectorRegistry()
        self.counters = _metrics(self.registry)

    def page(self):
        return send_from_directory(str(self.static_folder), "index.html")

    def indices_list(self):
        return jsonify([self.service.name])

    def knn_service(self):
        started = time.perf_counter()
        body = parse_body(request.get_data(cache=False))
        results = self.service.knn(body, base_url=request.host_url.rstrip("/"))
        kind = _query_kind(body)
        self.counters["queries"].labels(body.get("modality") or "image", kind).inc()
        self.counters["latency"].labels(kind).observe(time.perf_counter() - started)
        return jsonify(results)

    def metadata(self):
        return jsonify(self.service.metadata(parse_body(request.get_data(cache=False))))

    def thumbnail(self, modality: str, item_id: int):
        response = Response(self.service.thumbnail(modality, item_id), mimetype="image/jpeg")
        response.headers["Cache-Control"] = "public, max-age=86400"
        return response

    def healthz(self):
        return jsonify(self.service.describe())

    def metrics(self):
        return Response(generate_latest(self.registry), mimetype=CONTENT_TYPE_LATEST)


@dataclass(frozen=True)
class Route:
    """One route: the Handlers method that answers method + path (Flask's syntax), and what it answers."""

    method: str
    path: str
    handler: Callable
    what: str


ROUTES = (
    Route("GET", "/", Handlers.page, "the search page (static files of this package; nothing from outside)"),
    Route("GET", "/indices-list", Handlers.indices_list, '["NAME"]: the one collection this server holds'),
    Route("POST", "/knn-service", Handlers.knn_service,
          "{text | image (base64) | embedding_input | id, modality, num_images, ...} -> results best first"),
    Route("POST", "/metadata", Handlers.metadata, '{"ids": [...]} -> [{"id", "metadata"}]'),
    Route("GET", "/thumbnail/<modality>/<int:item_id>", Handlers.thumbnail,
          "JPEG thumbnail of an indexed item (by id; never a path from the request)"),
    Route("GET", "/healthz", Handlers.healthz, '{"status": "ok", "name", "model", "indexes"}'),
    Route("GET", "/metrics", Handlers.metrics, "Prometheus text: queries, latency histogram, refused requests"),
)


def _register_errors(app, handlers: Handlers) -> None:
    """Every refusal as {"error": message} with its status, counted; anything unexpected logged and 500."""
    limits = handlers.service.limits

    def answer(message: str, status: int):
        handlers.counters["refused"].labels(str(status)).inc()
        return jsonify(error=message), status

    def http_error(error: HTTPException):
        if error.code == 413:
            return answer(f"the request body is larger than {limits.max_body_bytes} bytes (an image may have "
                          f"{limits.max_upload_bytes} bytes before base64)", 413)
        return answer(error.description, error.code)

    def failed(error: Exception):
        LOGGER.exception("request %s %s failed", request.method, request.path)
        return answer(f"internal error ({type(error).__name__})", 500)

    app.register_error_handler(RequestError, lambda error: answer(str(error), error.status))
    app.register_error_handler(HTTPException, http_error)
    app.register_error_handler(Exception, failed)


def _guard(hosts: AllowedHosts) -> None:
    """Before any route: the Host header names this server; a POST carries JSON and comes from no other page."""
    port = request.environ.get("SERVER_PORT")
    host = request.headers.get("Host", "")
    if not hosts.allows(host, port):
        raise RequestError(f"this server does not answer to the host {host!r:.80} (it answers to "
                           f"{hosts.describe()}; start it with --allowed-hosts to add one)", status=421)
    if request.method != "POST":
        return
    origin = request.headers.get("Origin")
    if origin is not None and not hosts.allows_origin(origin, port):
        raise RequestError(f"requests from pages of {origin!r:.80} are refused", status=403)
    if request.mimetype not in ("", "application/json"):
        raise RequestError(f"the body must be JSON sent as application/json, not {request.mimetype:.80}", 415)


def create_app(
    indexes,
    encoders=None,
    *,
    name: str | None = None,
    limits: ServeLimits | None = None,
    allowed_hosts: AllowedHosts | None = None,
    image_root: str | Path | None = None,
    model_name: str | None = None,
    any_model: bool = False,
):
    """The Flask application serving one collection.

    indexes: an index folder (see service.load_indexes) or {modality: Index}. encoders: what
    openalign.inference.encoders.load_encoders returns, or None to serve embedding and id queries only.
    name: the collection's name in /indices-list (default: the folder's name). allowed_hosts: the Host
    headers answered (default: the loopback names). image_root: where relative image paths of the metadata
    start (default: found above the index folder, service.find_image_root). model_name: the model as /healthz
    names it (default: its folder's name). any_model: serve with a model other than the one model.json records.
    """
    index_dir = None
    if isinstance(indexes, (str, Path)):
        index_dir = Path(indexes)
        name = name or index_dir.resolve().name
        indexes = load_indexes(index_dir)
    service = SearchService(indexes, encoders, name=name or "openalign", limits=limits, index_dir=index_dir,
                            image_root=image_root, model_name=model_name, any_model=any_model)
    static_folder = resources.files("openalign.serve") / "static"
    app = Flask(__name__, static_folder=str(static_folder), static_url_path="/static")
    # Flask answers a longer body 413 without parsing it; waitress bounds what it reads (server.py).
    app.config["MAX_CONTENT_LENGTH"] = service.limits.max_body_bytes
    app.extensions["openalign_service"] = service
    handlers = Handlers(service, static_folder)
    for route in ROUTES:
        handler = getattr(handlers, route.handler.__name__)
        app.add_url_rule(route.path, route.handler.__name__, handler, methods=[route.method])
    _register_errors(app, handlers)
    hosts = allowed_hosts or AllowedHosts()
    app.before_request(lambda: _guard(hosts))

    @app.after_request
    def headers(response):
        for header, value in SECURITY_HEADERS.items():
            response.headers.setdefault(header, value)
        return response

    return app
