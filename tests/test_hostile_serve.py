"""Hostile and careless requests to `openalign serve`: small uploads that decode to gigabytes (the server's memory
measured from /proc), slow clients holding every connection, DNS rebinding and cross-site POSTs, JSON no search
can use, degenerate embeddings, out-of-range command-line values, a model that does not fit the index, image
paths relative to where the collection was made, and deduplication of 10,000 results. Servers run as the
installed command runs (`python -m openalign serve` on 127.0.0.1, port 0); every load is bounded in count and
time and sent to 127.0.0.1 only."""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import torch
from PIL import Image

from openalign.cli import build_parser, main
from openalign.index.faiss_index import build_index
from openalign.inference.embed import embed_to_folder
from openalign.serve import AllowedHosts, ServeLimits, create_app
from openalign.serve.dedup import duplicate_positions
from tests.serve_fixtures import brute_force, request, serving

COMMON_LOG_LINE = re.compile(r'^127\.0\.0\.1 - - \[\d{2}/\w{3}/\d{4}:\d{2}:\d{2}:\d{2} [+-]\d{4}\] '
                             r'"GET /healthz HTTP/1\.1" 200 \d+$', re.MULTILINE)


@pytest.fixture(scope="module")
def served(serve_collection, tmp_path_factory):
    with serving(serve_collection["index"], tmp_path_factory.mktemp("log") / "serve.log") as running:
        yield running


def _encoded(image: Image.Image, **save) -> str:
    buffer = io.BytesIO()
    image.save(buffer, **save)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _memory_kib(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return int(line.split()[1])
    raise AssertionError(f"/proc/{pid}/status has no {name}")


def test_small_uploads_that_decode_large_keep_the_server_within_a_gigabyte(served):
    # Each a few hundred KB: float and 16-bit images of 6300 x 6300 (1.7-1.9 GB each through float64 copies),
    # the same kinds at the pixel limit, which are decoded, and a 24-megapixel JPEG, decoded at reduced scale.
    over_float = _encoded(Image.new("F", (6300, 6300), 0.5), format="TIFF", compression="tiff_adobe_deflate")
    over_sixteen = _encoded(Image.new("I;16", (6300, 6300), 1000), format="PNG", compress_level=9)
    side = int(ServeLimits().max_pixels ** 0.5)
    at_float = _encoded(Image.new("F", (side, side), 0.5), format="TIFF", compression="tiff_adobe_deflate")
    at_sixteen = _encoded(Image.new("I;16", (side, side), 1000), format="PNG", compress_level=9)
    photo = _encoded(Image.new("RGB", (6000, 4000), (120, 30, 200)), format="JPEG", quality=50)
    uploads = [(over_float, {400}), (over_sixteen, {400}), (at_float, {200, 503}), (at_sixteen, {200, 503}),
               (at_float, {200, 503}), (at_sixteen, {200, 503}), (photo, {200, 503}), (photo, {200, 503})]
    assert max(len(text) for text, _ in uploads) < 600_000

    small = _encoded(Image.new("RGB", (64, 48), (10, 200, 30)), format="PNG")
    assert request(served.url, "POST", "/knn-service", json.dumps({"image": small, "num_images": 3}))[0] == 200
    idle = _memory_kib(served.pid, "VmRSS")
    peak, answers, stop = [idle], [None] * len(uploads), threading.Event()

    def watch():
        while not stop.is_set():
            peak.append(_memory_kib(served.pid, "VmRSS"))
            time.sleep(0.01)

    def upload(position: int):
        body = json.dumps({"image": uploads[position][0], "num_images": 3})
        answers[position] = request(served.url, "POST", "/knn-service", body, timeout=120)

    watcher = threading.Thread(target=watch)
    watcher.start()
    senders = [threading.Thread(target=upload, args=(position,)) for position in range(len(uploads))]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(timeout=150)
    stop.set()
    watcher.join()
    time.sleep(1.0)
    after = _memory_kib(served.pid, "VmRSS")
    growth, kept = (max(peak) - idle) / 2**20, (after - idle) / 2**20
    print(f"\nserver RSS idle {idle / 2**20:.2f} GiB, peak +{growth:.2f} GiB under {len(uploads)} hostile uploads, "
          f"+{kept:.2f} GiB after; VmHWM {_memory_kib(served.pid, 'VmHWM') / 2**20:.2f} GiB")
    for (_text, expected), answer in zip(uploads, answers):
        assert answer is not None and answer[0] in expected, f"{answer!r:.300}"
        if answer[0] != 200:
            assert answer[1]["error"], answer
    assert sum(answer[0] == 200 for answer in answers) >= 2  # the slots let uploads through, not only refuse
    assert "above the limit" in answers[0][1]["error"]
    assert growth < 1.0 and kept < 0.75  # what stays is freed memory the allocator keeps for reuse
    assert "Traceback" not in served.log()


def test_slow_clients_cannot_keep_healthz_unanswered(serve_collection, tmp_path):
    # More clients than connection slots, each sending its headers a byte at a time and never finishing: every
    # slot is taken, and /healthz waits until the server closes requests that take longer than --request-timeout.
    with serving(serve_collection["index"], tmp_path / "serve.log", "--no-model", "--quiet",
                 "--connection-limit", "6", "--request-timeout", "1") as slow_served:
        parts = urlsplit(slow_served.url)
        stop = threading.Event()
        clients = [socket.create_connection((parts.hostname, parts.port), timeout=5) for _ in range(6)]

        def trickle(client: socket.socket):
            for byte in b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 1000:
                try:
                    client.send(bytes([byte]))
                except OSError:
                    return  # the server closed it
                if stop.wait(0.2):
                    return

        threads = [threading.Thread(target=trickle, args=(client,)) for client in clients]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        started = time.monotonic()
        try:
            status, health = request(slow_served.url, "GET", "/healthz", timeout=20)
        except TimeoutError:
            status, health = None, None
        waited = time.monotonic() - started
        stop.set()
        for thread in threads:
            thread.join()
        for client in clients:
            client.close()
        assert status == 200 and health["status"] == "ok", f"/healthz unanswered after {waited:.1f} s"
        assert waited < 10
        assert not COMMON_LOG_LINE.search(slow_served.log())  # --quiet: no access log


def test_host_header_origin_and_content_type(served, serve_collection):
    port = urlsplit(served.url).port
    body = json.dumps({"embedding_input": [1.0] * 80, "num_images": 2})
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1:{port + 1}", f"localhost.evil.example:{port}"):
        status, answer = request(served.url, "POST", "/knn-service", body, headers={"Host": host})
        assert status == 421 and "url" not in answer and "/thumbnail/" not in json.dumps(answer), (host, answer)
        assert "--allowed-hosts" in answer["error"]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost"):
        status, results = request(served.url, "POST", "/knn-service", body, headers={"Host": host})
        assert status == 200 and results[0]["url"].startswith(f"http://{host}/thumbnail/"), (host, results)
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        status, answer = request(served.url, "POST", "/knn-service", body, headers={"Content-Type": content_type})
        assert status == 415 and "application/json" in answer["error"], content_type
    assert request(served.url, "POST", "/knn-service", body, headers={"Content-Type": "application/json"})[0] == 200
    assert request(served.url, "POST", "/knn-service", body)[0] == 200  # ClipClient sends no Content-Type
    for origin in ("http://evil.example", "null", f"http://127.0.0.1.evil.example:{port}"):
        status, answer = request(served.url, "POST", "/knn-service", body, headers={"Origin": origin})
        assert status == 403, origin
    assert request(served.url, "POST", "/knn-service", body, headers={"Origin": f"http://127.0.0.1:{port}"})[0] == 200

    # A deployment behind a proxy names its public host (with or without the proxy's port).
    app = create_app(serve_collection["index"], allowed_hosts=AllowedHosts(["search.example", "proxy.example:443"]))
    client = app.test_client()
    assert client.get("/healthz", headers={"Host": "search.example"}).status_code == 200
    assert client.get("/healthz", headers={"Host": "proxy.example:443"}).status_code == 200
    assert client.get("/healthz", headers={"Host": "proxy.example:444"}).status_code == 421
    assert client.get("/healthz", headers={"Host": "other.example"}).status_code == 421


def test_json_a_search_cannot_use_is_refused_with_a_message(served):
    digits = "1" + "0" * 399
    bodies = {
        "nested 100,000 deep": "[" * 100_000 + "]" * 100_000,
        "nested 100 deep in a field": '{"text": "a", "x": ' + "[" * 100 + "]" * 100 + "}",
        "a lone surrogate": '{"text": "a red \\ud800 bicycle", "num_images": 3}',
        "a lone surrogate in a key": '{"\\udfff": 1, "text": "a"}',
        "a 400-digit count": '{"text": "a", "num_images": ' + digits + "}",
        "a 400-digit id": '{"id": -' + digits + "}",
        "a 400-digit embedding value": '{"embedding_input": [' + ", ".join([digits] * 80) + "]}",
        "NaN": '{"embedding_input": [' + ", ".join(["NaN"] * 80) + "]}",
        "Infinity": '{"text": "a", "num_images": Infinity}',
        "1e400": '{"embedding_input": [' + ", ".join(["1e400"] * 80) + "]}",
        "bytes that are not UTF-8": b'{"text": "\xff\xfe"}',
    }
    for description, body in bodies.items():
        status, answer = request(served.url, "POST", "/knn-service", body)
        assert status == 400 and isinstance(answer, dict) and answer["error"], f"{description}: {status} {answer}"
    status, answer = request(served.url, "POST", "/metadata", '{"ids": [' + digits + "]}")
    assert status == 400 and "digits" in answer["error"]
    assert "Traceback" not in served.log()


def test_degenerate_embeddings(serve_collection):
    client = create_app(serve_collection["index"]).test_client()  # embedding queries need no model
    dim = 80
    for values, words in (([0.0] * dim, "all zeros"), ([1e308] * dim, "beyond a 32-bit float"),
                          ([1.0] * (dim - 1) + [-1e39], "beyond a 32-bit float")):
        answer = client.post("/knn-service", json={"embedding_input": values, "num_images": 3})
        assert answer.status_code == 400 and words in answer.json["error"]
    # Any finite scale is the same direction; float32 sums of squares of these overflow or underflow.
    expected_ids, expected_scores = brute_force(serve_collection, np.ones((1, dim)) / dim**0.5, "image", 5)
    for scale in (1e20, 1e-30, 1.0):
        answer = client.post("/knn-service", json={"embedding_input": [scale] * dim, "num_images": 5})
        assert answer.status_code == 200
        assert [hit["id"] for hit in answer.json] == expected_ids[0].tolist(), scale
        np.testing.assert_allclose([hit["similarity"] for hit in answer.json], expected_scores[0], atol=2e-3)


@pytest.mark.parametrize("arguments, message", [
    (["serve", "an-index", "--threads", "0"], "argument --threads: 0 is outside 1..1024"),
    (["serve", "an-index", "--port", "70000"], "argument --port: 70000 is outside 0..65535"),
    (["serve", "an-index", "--port", "-1"], "argument --port: -1 is outside 0..65535"),
    (["serve", "an-index", "--request-timeout", "1e400"], "argument --request-timeout: 1e400 is outside 0.1..3600.0"),
    (["serve", "an-index", "--request-timeout", "nan"], "argument --request-timeout: nan is outside"),
    (["serve", "an-index", "--max-pixels", "1e400"], "argument --max-pixels: '1e400' is not an integer"),
    (["index", "embeddings", "--memory-budget", "1e400"], "argument --memory-budget: 1e400 is not a size from"),
])
def test_arguments_out_of_range_are_one_line(arguments, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        build_parser().parse_args(arguments)
    error = capsys.readouterr().err
    assert stopped.value.code == 2 and message in error.splitlines()[-1] and "Traceback" not in error


def _embedding_folder(path: Path, vectors: np.ndarray) -> Path:
    """An embedding folder of texts "item i" whose embeddings are vectors[i]."""
    table = torch.tensor(vectors, dtype=torch.float32)
    items = [{"source": f"key-{i}", "caption": f"item {i}"} for i in range(len(vectors))]
    embed_to_folder(items, lambda captions: table[[int(caption.split()[1]) for caption in captions]], path,
                    kind="text", part_size=len(vectors), batch_size=4096, progress=False)
    return path


def test_a_model_that_does_not_fit_the_index_is_refused_at_start(checkpoint, tmp_path):
    index = tmp_path / "index"
    build_index(_embedding_folder(tmp_path / "embeddings", np.eye(16, dtype=np.float32)), index)
    finished = subprocess.run([sys.executable, "-m", "openalign", "serve", str(index), "--model", str(checkpoint),
                               "--port", "0"], capture_output=True, text=True, timeout=120)
    lines = finished.stderr.strip().splitlines()
    assert finished.returncode == 1 and len(lines) == 1, finished.stderr
    assert "80-dimensional" in lines[0] and "16-dimensional" in lines[0] and str(index) in lines[0]


def test_relative_image_paths_do_not_depend_on_the_working_directory(checkpoint, tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "images").mkdir(parents=True)
    for number in range(3):
        Image.new("RGB", (40, 30), (80 * number, 20, 200)).save(project / "images" / f"photo-{number}.png")
    monkeypatch.chdir(project)  # paths as a user types them, relative to the project
    assert main(["embed", "images", "--model", str(checkpoint), "--out", "embeddings", "--no-progress"]) == 0
    assert main(["index", "embeddings", "--out", "index"]) == 0
    monkeypatch.chdir(tmp_path)  # the server runs from elsewhere
    client = create_app(project / "index").test_client()
    assert client.post("/metadata", json={"ids": [1]}).json[0]["metadata"]["source"] == "images/photo-1.png"
    thumbnail = client.get("/thumbnail/image/1")
    assert thumbnail.status_code == 200, thumbnail.json
    assert Image.open(io.BytesIO(thumbnail.data)).getpixel((5, 5))[0] == pytest.approx(80, abs=3)


def test_access_log_and_healthz_without_paths(served):
    status, health = request(served.url, "GET", "/healthz")
    assert status == 200 and health["model"] == "checkpoint"
    assert not any(isinstance(value, str) and value.startswith("/") for value in health.values())
    deadline = time.monotonic() + 10
    while not COMMON_LOG_LINE.search(served.log()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert COMMON_LOG_LINE.search(served.log()), served.log()[-2000:]
    request(served.url, "GET", "/thumbnail/image/0%0A127.0.0.1%20-%20forged")  # a line break cannot be forged
    assert not re.search(r"^127\.0\.0\.1 - forged", served.log(), re.MULTILINE)


def _brute_force_duplicates(vectors: np.ndarray, threshold: float = 0.94) -> set[int]:
    """Positions that are not the lowest of their connected group, by label propagation over every pair."""
    close = vectors @ vectors.T > threshold
    label = list(range(len(vectors)))
    changed = True
    while changed:
        changed = False
        for first in range(len(vectors)):
            for second in range(len(vectors)):
                if close[first, second] and label[second] > label[first]:
                    label[second], changed = label[first], True
    return {position for position in range(len(vectors)) if label[position] != position}


def test_deduplication_equals_brute_force_and_is_bounded_at_10000_results(tmp_path):
    rng = np.random.default_rng(0)
    for trial in range(20):  # chains, groups and singletons, across block boundaries
        centres = rng.standard_normal((int(rng.integers(1, 8)), 8))
        vectors = centres[rng.integers(0, len(centres), 50)] + rng.uniform(0.05, 0.4) * rng.standard_normal((50, 8))
        vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
        expected = _brute_force_duplicates(vectors)
        assert set(duplicate_positions(vectors, block_rows=int(rng.integers(1, 9))).tolist()) == expected, trial

    # 10,000 results in 20 groups of near copies (about 2.5 million close pairs): one result per group.
    groups = 20
    centres = rng.standard_normal((groups, 32))
    membership = rng.integers(0, groups, 10_000)
    vectors = (centres[membership] + 0.01 * rng.standard_normal((10_000, 32))).astype(np.float32)
    index = tmp_path / "index"
    build_index(_embedding_folder(tmp_path / "embeddings", vectors), index)
    client = create_app(index).test_client()
    body = {"embedding_input": centres[0].tolist(), "num_images": 1000, "num_result_ids": 10_000,
            "deduplicate": True, "modality": "text"}
    tracemalloc.start()
    started = time.perf_counter()
    answer = client.post("/knn-service", json=body)
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    print(f"\ndeduplicate=true over 10,000 results: {seconds:.1f} s, peak traced memory {peak:.0f} MiB")
    assert answer.status_code == 200
    kept_groups = [int(membership[hit["id"]]) for hit in answer.json]
    assert len(kept_groups) == groups and len(set(kept_groups)) == groups and kept_groups[0] == 0
    assert peak < 200 and seconds < 60  # the dense matrix alone was 400 MB; the pair loop took 56 s
