"""The web layer of `openalign serve`: a Flask application over a SearchService, served by waitress.

Routes (clip-retrieval's back end's, so that its `ClipClient` and front end work unchanged, plus openalign's):

    GET  /                         the search page (static files of this package; nothing from outside)
    GET  /indices-list             ["NAME"]: the one collection this server holds
    POST /knn-service              {text | image (base64) | embedding_input | id, modality, num_images, ...}
    POST /metadata                 {"ids": [...]} -> [{"id", "metadata"}]
    GET  /thumbnail/MODALITY/ID    JPEG thumbnail of an indexed item (by id; never a path from the request)
    GET  /healthz                  {"status": "ok", ...}
    GET  /metrics                  Prometheus text: queries, latency histogram, refused requests

Request bodies are parsed as JSON whatever their Content-Type (ClipClient sends none). A refused request gets
{"error": message} with a 4xx status; an unexpected failure is logged and answered 500, and the server goes
on serving.
"""

from __future__ import annotations

import json
import logging
import time
from importlib import resources
from pathlib import Path

from openalign.errors import OpenAlignError
from openalign.serve.service import RequestError, SearchService, ServeLimits, load_indexes

LOGGER = logging.getLogger("openalign.serve")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServerStartError(OpenAlignError, RuntimeError):
    """The server cannot listen where it was asked to (port in use, address not of this machine)."""


def _metrics(registry):
    from prometheus_client import Counter, Histogram

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


def create_app(
    indexes,
    encoders=None,
    *,
    name: str | None = None,
    limits: ServeLimits | None = None,
):
    """The Flask application serving one collection.

    indexes: an index folder (see service.load_indexes) or {modality: Index}. encoders: what
    openalign.inference.encoders.load_encoders returns, or None to serve embedding and id queries only.
    name: the collection's name in /indices-list (default: the folder's name).
    """
    from flask import Flask, Response, jsonify, request, send_from_directory
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from werkzeug.exceptions import HTTPException

    if isinstance(indexes, (str, Path)):
        name = name or Path(indexes).resolve().name
        indexes = load_indexes(indexes)
    service = SearchService(indexes, encoders, name=name or "openalign", limits=limits)
    static_folder = resources.files("openalign.serve") / "static"
    app = Flask(__name__, static_folder=str(static_folder), static_url_path="/static")
    # Flask answers a longer body 413 without parsing it; waitress bounds what it reads (run_server).
    app.config["MAX_CONTENT_LENGTH"] = service.limits.max_body_bytes
    app.extensions["openalign_service"] = service
    registry = CollectorRegistry()
    metrics = _metrics(registry)

    def json_body():
        data = request.get_data(cache=False)
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as error:
            raise RequestError(f"the request body is not valid JSON ({error})") from error

    @app.errorhandler(RequestError)
    def refused(error: RequestError):
        metrics["refused"].labels(str(error.status)).inc()
        return jsonify(error=str(error)), error.status

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        metrics["refused"].labels(str(error.code)).inc()
        message = error.description
        if error.code == 413:
            message = (f"the request body is larger than {service.limits.max_body_bytes} bytes (an image may have "
                       f"{service.limits.max_upload_bytes} bytes before base64)")
        return jsonify(error=message), error.code

    @app.errorhandler(Exception)
    def failed(error: Exception):
        LOGGER.exception("request %s %s failed", request.method, request.path)
        metrics["refused"].labels("500").inc()
        return jsonify(error=f"internal error ({type(error).__name__})"), 500

    @app.get("/")
    def page():
        return send_from_directory(str(static_folder), "index.html")

    @app.get("/indices-list")
    def indices_list():
        return jsonify([service.name])

    @app.post("/knn-service")
    def knn_service():
        started = time.perf_counter()
        body = json_body()
        results = service.knn(body, base_url=request.host_url.rstrip("/"))
        kind = _query_kind(body)
        metrics["queries"].labels(body.get("modality") or "image", kind).inc()
        metrics["latency"].labels(kind).observe(time.perf_counter() - started)
        return jsonify(results)

    @app.post("/metadata")
    def metadata():
        return jsonify(service.metadata(json_body()))

    @app.get("/thumbnail/<modality>/<int:item_id>")
    def thumbnail(modality: str, item_id: int):
        response = Response(service.thumbnail(modality, item_id), mimetype="image/jpeg")
        response.headers["Cache-Control"] = "public, max-age=86400"
        return response

    @app.get("/healthz")
    def healthz():
        return jsonify(service.describe())

    @app.get("/metrics")
    def prometheus_metrics():
        return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)

    @app.after_request
    def headers(response):
        # The page loads nothing from elsewhere; say so to the browser too.
        response.headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'",
        )
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response

    return app


def is_loopback(host: str) -> bool:
    """Whether host only accepts connections from this machine."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_server(app, *, host: str = "127.0.0.1", port: int = 8000, threads: int = 8, announce=print) -> None:
    """Serve app with waitress until interrupted; announce("... http://HOST:PORT") once listening (port 0
    picks a free port, and the announcement names it)."""
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
    try:
        server = create_server(
            app,
            host=host,
            port=port,
            threads=threads,
            # Waitress reads a body (spooled to a temporary file past 512 KB) before the application sees it,
            # and cuts the connection of one over its own limit mid-upload. Up to twice the limit the body is
            # read and Flask answers 413 with a message the client can show; beyond, the connection is cut.
            max_request_body_size=2 * service.limits.max_body_bytes,
            channel_timeout=30,
            connection_limit=256,
            ident="openalign",
        )
    except OSError as error:
        raise ServerStartError(f"cannot listen on {host}:{port} ({error})") from error
    announce(f"openalign serve: {service.name} on http://{host}:{server.effective_port}")
    try:
        server.run()
    finally:
        server.close()
