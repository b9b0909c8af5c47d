"""A bounded load generator for a search server on this machine: a fixed list of requests, a fixed number of
concurrent connections and a time limit, loopback addresses only. Used by the tests and benchmarks/serve_load.py.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import numpy as np

from openalign.serve.server import is_loopback


@dataclass
class LoadReport:
    """What run_load measured. responses[i] is request i's (status, parsed JSON body) or None if not sent."""

    sent: int
    errors: list[str]
    latencies_ms: np.ndarray
    wall_seconds: float
    responses: list = field(repr=False)

    def percentile_ms(self, percentile: float) -> float:
        """Latency percentile of the requests sent, in milliseconds."""
        return float(np.percentile(self.latencies_ms, percentile)) if len(self.latencies_ms) else float("nan")

    def summary(self) -> str:
        """One line: count, errors, p50 / p99 and throughput."""
        return (f"{self.sent} requests, {len(self.errors)} errors, p50 {self.percentile_ms(50):.1f} ms, "
                f"p99 {self.percentile_ms(99):.1f} ms, {self.sent / max(self.wall_seconds, 1e-9):.0f} requests/s")


def _loopback_address(base_url: str) -> tuple[str, int]:
    parts = urlsplit(base_url)
    host = parts.hostname or ""
    if parts.scheme != "http" or not is_loopback(host) or parts.port is None:
        raise ValueError(f"{base_url}: load is only ever sent to http://127.0.0.1:PORT (a loopback address)")
    return host, parts.port


def run_load(
    base_url: str,
    bodies: list[dict],
    *,
    path: str = "/knn-service",
    concurrency: int = 8,
    max_seconds: float = 60.0,
) -> LoadReport:
    """POST each body once as JSON to base_url + path over `concurrency` keep-alive connections; stop sending
    after max_seconds. A status other than 200, or a failed connection, is an error."""
    host, port = _loopback_address(base_url)
    deadline = time.monotonic() + max_seconds
    responses: list = [None] * len(bodies)
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    next_request = iter(range(len(bodies)))

    def worker():
        connection = http.client.HTTPConnection(host, port, timeout=max_seconds)
        try:
            while time.monotonic() < deadline:
                with lock:
                    index = next(next_request, None)
                if index is None:
                    return
                data = json.dumps(bodies[index]).encode()
                started = time.perf_counter()
                try:
                    connection.request("POST", path, body=data, headers={"Content-Type": "application/json"})
                    response = connection.getresponse()
                    payload = response.read()
                except (OSError, http.client.HTTPException) as error:
                    connection.close()
                    connection = http.client.HTTPConnection(host, port, timeout=max_seconds)
                    with lock:
                        errors.append(f"request {index}: {type(error).__name__}: {error}")
                    continue
                elapsed = 1000 * (time.perf_counter() - started)
                with lock:
                    latencies.append(elapsed)
                    responses[index] = (response.status, json.loads(payload) if payload else None)
                    if response.status != 200:
                        errors.append(f"request {index}: status {response.status}: {payload[:200]!r}")
        finally:
            connection.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max_seconds + 30)
    wall = time.perf_counter() - started
    sent = sum(response is not None for response in responses)
    return LoadReport(sent, errors, np.asarray(latencies), wall, responses)
