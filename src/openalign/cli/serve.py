"""`openalign serve INDEX_DIR [--model CKPT|HUB_ID] [--host 127.0.0.1] [--port 8000]`: search as a service.

Loads the model once and the index (memory-mapped where its kind allows) and serves clip-retrieval's JSON API
(`/indices-list`, `/knn-service`, `/metadata`), a search page at `/`, `/healthz` and `/metrics`, with an access
log on stdout in the Common Log Format (`--quiet` turns it off):

    openalign serve photos-index --port 8000
    python -c "from clip_retrieval.clip_client import ClipClient; \\
        print(ClipClient('http://127.0.0.1:8000/knn-service', 'photos-index').query(text='a red bicycle'))"
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from openalign.cli._common import add_model_arguments, encoders_from_arguments, number_in_range
from openalign.cli._help import add_command


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `serve` command."""
    from openalign.serve.limits import CONNECTION_LIMIT, REQUEST_SECONDS, ServeLimits

    parser = add_command(
        subparsers, "serve", help="serve an index over HTTP: clip-retrieval's API and a search page",
        description="Serve an index over HTTP: clip-retrieval's JSON API (/indices-list, /knn-service, "
                    "/metadata), a search page at /, /healthz and /metrics. It binds 127.0.0.1 (this machine "
                    "only) unless --host says otherwise, and answers only requests that name it (--allowed-hosts).",
        examples=("openalign serve embeddings/index   # then open http://127.0.0.1:8000",
                  "openalign serve photos-index --port 8080 -m runs/first/model",
                  "python -c \"from clip_retrieval.clip_client import ClipClient; print(ClipClient("
                  "'http://127.0.0.1:8000/knn-service', 'photos-index').query(text='a red bicycle'))\""))
    parser.add_argument("index", help="index folder written by `openalign index`, or one holding image/ and text/")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (127.0.0.1: this machine only; anything else is public)")
    parser.add_argument("--port", type=number_in_range(int, 0, 65535), default=8000, help="port (0 picks a free one)")
    parser.add_argument("--threads", type=number_in_range(int, 1, 1024), default=8, help="request threads")
    parser.add_argument("--name", help="the collection's name in /indices-list (default: the folder's name)")
    parser.add_argument("--no-model", action="store_true",
                        help="load no model: only embedding_input and id queries (no text or image)")
    parser.add_argument("--any-model", action="store_true",
                        help="serve with a --model other than the one the index's model.json records (its config "
                             "and weights are hashed there); refused otherwise, since its hits would mean nothing")
    parser.add_argument("--allowed-hosts", nargs="+", default=[], metavar="HOST[:PORT]",
                        help="host names requests may name besides 127.0.0.1, localhost, [::1] and --host, e.g. "
                             "the name a reverse proxy is reached by (a guard against DNS rebinding)")
    parser.add_argument("--image-root", type=Path,
                        help="the folder relative image paths of the index start from (default: the nearest "
                             "folder above the index that holds them)")
    parser.add_argument("--max-pixels", type=number_in_range(int, 1, 2**31), default=ServeLimits.max_pixels,
                        help="largest query image, in decoded pixels (a JPEG counts at the reduced size it is "
                             "decoded at)")
    parser.add_argument("--connection-limit", type=number_in_range(int, 1, 100_000), default=CONNECTION_LIMIT,
                        help="open connections at most; more wait to be accepted")
    parser.add_argument("--request-timeout", type=number_in_range(float, 0.1, 3600.0), default=REQUEST_SECONDS,
                        help="seconds a request may take to arrive whole before its connection is closed")
    parser.add_argument("--quiet", action="store_true", help="write no access log")
    add_model_arguments(parser, required=False)
    parser.set_defaults(func=run)


def _model_of(index_dir: Path) -> str | None:
    """The checkpoint named by the index folder's model.json (or that of its image/ or text/ index)."""
    from openalign.inference.embedding_folder import read_model_reference

    for folder in (index_dir, index_dir / "image", index_dir / "text"):
        if (model := read_model_reference(folder)) is not None:
            return model
    return None


def _access_logger() -> logging.Logger:
    """The access log: bare Common Log Format lines on stdout (the server's own messages go to stderr)."""
    logger = logging.getLogger("openalign.serve.access")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


def run(args: argparse.Namespace) -> int:
    """Load the index and the encoders, then serve until interrupted."""
    from openalign.serve import AllowedHosts, ServeLimits, create_app, run_server

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("openalign").setLevel(logging.INFO)
    index_dir = Path(args.index)
    if not index_dir.is_dir():
        raise SystemExit(f"openalign serve: {index_dir} is not a folder (expected an index from `openalign index`)")
    encoders = None
    if not args.no_model:
        args.model = args.model or _model_of(index_dir)
        if args.model is None:
            raise SystemExit(f"openalign serve: {index_dir} names no model (model.json); pass --model or --no-model")
        encoders = encoders_from_arguments(args)
    app = create_app(index_dir, encoders, name=args.name, limits=ServeLimits(max_pixels=args.max_pixels),
                     allowed_hosts=AllowedHosts([args.host, *args.allowed_hosts]), image_root=args.image_root,
                     model_name=args.model, any_model=args.any_model)
    try:
        run_server(app, host=args.host, port=args.port, threads=args.threads,
                   connection_limit=args.connection_limit, request_seconds=args.request_timeout,
                   access_log=None if args.quiet else _access_logger().info,
                   announce=lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        pass
    return 0
