"""A small collection (images with captions, both kinds embedded and indexed) and `openalign serve` over it in a
subprocess on a free loopback port; the brute-force answers that the server must give."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from openalign.cli import main
from tests.cli_fixtures import CAPTIONS, direct_image_embeddings, direct_text_embeddings, make_checkpoint, make_images

NUM_ITEMS = 24


def make_collection(root: Path) -> dict:
    """Checkpoint, NUM_ITEMS captioned images, an embedding folder of both kinds and root/index/{image,text}."""
    checkpoint = make_checkpoint(root / "checkpoint")
    images = make_images(root / "images", NUM_ITEMS)
    # Distinct token sequences from the tiny vocabulary (a number would be [UNK] and make captions tie).
    captions = [CAPTIONS[i] if i < len(CAPTIONS) else f"{CAPTIONS[i % len(CAPTIONS)]} and {CAPTIONS[(i + 1) % 12]}"
                for i in range(NUM_ITEMS)]
    for image, caption in zip(images, captions):
        image.with_suffix(".txt").write_text(caption)
    main(["embed", str(root / "images"), "--model", str(checkpoint), "--out", str(root / "embeddings"),
          "--kind", "both", "--part-size", "7", "--no-progress"])
    for kind in ("image", "text"):
        main(["index", str(root / "embeddings"), "--embed-kind", kind, "--out", str(root / "index" / kind)])
    return {"checkpoint": checkpoint, "images": images, "captions": captions, "index": root / "index"}


def brute_force(collection: dict, query_embeddings, modality: str, k: int):
    """(ids (Q, k), scores (Q, k)) of exact search over the float16-stored embeddings of the model called
    directly: what every query through the server must return."""
    if modality == "image":
        stored = direct_image_embeddings(collection["checkpoint"], collection["images"])
    else:
        stored = direct_text_embeddings(collection["checkpoint"], collection["captions"])
    stored = stored.numpy().astype(np.float16).astype(np.float32)
    scores = np.asarray(query_embeddings, dtype=np.float32) @ stored.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


@dataclass(frozen=True)
class Served:
    """A running `openalign serve`: its base URL, process id (its memory is in /proc/PID/status) and log."""

    url: str
    pid: int
    log_path: Path

    def log(self) -> str:
        """Everything the server has written so far (stdout and stderr)."""
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def serving(index_dir: Path, log_path: Path, *extra: str, startup_seconds: float = 120):
    """Run `openalign serve INDEX_DIR --port 0` as the installed command runs, and yield it (Served); stop it
    afterwards.

    The log goes to a file, not a pipe, so that a chatty server can never block on a full pipe.
    """
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "openalign", "serve", str(index_dir), "--port", "0", *extra],
            stdout=log, stderr=subprocess.STDOUT, env=environment,
        )
    try:
        deadline = time.monotonic() + startup_seconds
        while True:
            match = re.search(r"on (http://127\.0\.0\.1:\d+)", log_path.read_text(errors="replace"))
            if match:
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"openalign serve did not start:\n{log_path.read_text(errors='replace')}")
            time.sleep(0.1)
        yield Served(match.group(1), process.pid, log_path)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def request(base_url: str, method: str, path: str, body: bytes | str | None = None, headers: dict | None = None,
            timeout: float = 60):
    """(status, parsed JSON or raw bytes) of one request over a fresh connection."""
    parts = urlsplit(base_url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        payload = response.read()
    finally:
        connection.close()
    if response.getheader("Content-Type", "").startswith("application/json"):
        return response.status, json.loads(payload)
    return response.status, payload
