"""`openalign serve`: clip-retrieval's own ClipClient gets brute-force answers by text, image and embedding in
both modalities; a bounded load at concurrency 8 gets every answer right; a battery of bad requests is refused
with 4xx while the server keeps serving; the application's checks, metrics and deduplication in-process; the
page driven in headless Chromium. One server subprocess serves the whole module."""

from __future__ import annotations

import base64
import json
import os
import shutil
import struct
import zlib
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import numpy as np
import pytest

from openalign.inference.encoders import load_encoders
from openalign.serve import ServeLimits, create_app
from openalign.serve.dedup import duplicate_positions
from openalign.serve.load import run_load
from tests.cli_fixtures import direct_image_embeddings, direct_text_embeddings
from tests.clip_retrieval_peer import clip_retrieval_module
from tests.serve_fixtures import NUM_ITEMS, brute_force, request, serving

LOAD_QUERIES = 400  # benchmarks/serve_load.py sends 2,000


@pytest.fixture(scope="module")
def collection(serve_collection):
    return serve_collection


@pytest.fixture(scope="module")
def server(collection, tmp_path_factory):
    with serving(collection["index"], tmp_path_factory.mktemp("log") / "serve.log") as served:
        yield served.url


def _image_base64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def _bomb_png(width: int, height: int) -> bytes:
    """A PNG of a few hundred bytes whose header declares width x height pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(
        b"IEND", b"")


def test_clip_client_gets_brute_force_answers(collection, server):
    clip_client = clip_retrieval_module("clip_client")
    checkpoint, images, captions = collection["checkpoint"], collection["images"], collection["captions"]
    k = 6
    images_client = clip_client.ClipClient(f"{server}/knn-service", "index", num_images=k, deduplicate=False)
    text = "a red bicycle in the street"
    image_queries = [images[4], images[17]]
    queries = np.concatenate([direct_text_embeddings(checkpoint, [text]).numpy(),
                              direct_image_embeddings(checkpoint, image_queries).numpy()])
    expected_ids, expected_scores = brute_force(collection, queries, "image", k)
    answers = [images_client.query(text=text)] + [images_client.query(image=str(path)) for path in image_queries]
    answers.append(images_client.query(embedding_input=queries[0].tolist()))
    for results, ids, scores in zip(answers, [*expected_ids, expected_ids[0]], [*expected_scores, expected_scores[0]]):
        assert [result["id"] for result in results] == ids.tolist()
        np.testing.assert_allclose([result["similarity"] for result in results], scores, atol=2e-3)
    assert answers[1][0]["id"] == 4 and answers[2][0]["id"] == 17  # an image finds itself first
    best = answers[0][0]
    assert best["caption"] == captions[best["id"]] and best["source"] == str(images[best["id"]])
    assert best["url"] == f"{server}/thumbnail/image/{best['id']}"
    status, thumbnail = request(server, "GET", urlsplit(best["url"]).path)
    assert status == 200 and thumbnail[:2] == b"\xff\xd8"  # a JPEG

    # The text index: captions searched by text; ClipClient's defaults (deduplicate, safety and aesthetic
    # fields) are accepted, and deduplication only drops results.
    captions_client = clip_client.ClipClient(f"{server}/knn-service", "index", num_images=k,
                                             modality=clip_client.Modality.TEXT)
    query = direct_text_embeddings(checkpoint, [captions[7]]).numpy()
    ids, _ = brute_force(collection, query, "text", NUM_ITEMS)
    results = captions_client.query(text=captions[7])
    assert results[0]["id"] == ids[0][0] == 7 and results[0]["caption"] == captions[7]
    positions = [ids[0].tolist().index(result["id"]) for result in results]
    # clip-retrieval searches num_result_ids (= num_images for ClipClient) and drops near copies from those.
    assert positions == sorted(positions) and 1 <= len(results) <= k

    status, listed = request(server, "GET", "/indices-list")
    assert (status, listed) == (200, ["index"])
    status, metadata = request(server, "POST", "/metadata", json.dumps({"ids": [3, 0], "indice_name": "index"}))
    assert status == 200 and [entry["id"] for entry in metadata] == [3, 0]
    assert metadata[0]["metadata"]["caption"] == captions[3]


def _bad_requests(collection) -> list[tuple[str, str, str, bytes | None]]:
    ok = {"indice_name": "index", "modality": "image", "num_images": 5}
    limits = ServeLimits()
    return [
        ("not JSON", "POST", "/knn-service", b"{not json"),
        ("a JSON list", "POST", "/knn-service", b"[1, 2]"),
        ("no query", "POST", "/knn-service", json.dumps(ok).encode()),
        ("two queries", "POST", "/knn-service", json.dumps({**ok, "text": "a", "id": 1}).encode()),
        ("num_images 0", "POST", "/knn-service", json.dumps({**ok, "text": "a", "num_images": 0}).encode()),
        ("num_images 10^9", "POST", "/knn-service", json.dumps({**ok, "text": "a", "num_images": 10**9}).encode()),
        ("num_images true", "POST", "/knn-service", json.dumps({**ok, "text": "a", "num_images": True}).encode()),
        ("text a number", "POST", "/knn-service", json.dumps({**ok, "text": 5}).encode()),
        ("a long text", "POST", "/knn-service", json.dumps({**ok, "text": "word " * 10_000}).encode()),
        ("unknown modality", "POST", "/knn-service", json.dumps({**ok, "modality": "video", "text": "a"}).encode()),
        ("unknown index", "POST", "/knn-service", json.dumps({**ok, "indice_name": "laion5B", "text": "a"}).encode()),
        ("bad base64", "POST", "/knn-service", json.dumps({**ok, "image": "not base64!"}).encode()),
        ("a path as image", "POST", "/knn-service", json.dumps({**ok, "image": "/etc/passwd"}).encode()),
        ("a path as image_url", "POST", "/knn-service", json.dumps({**ok, "image_url": "file:///etc/passwd"}).encode()),
        ("a path as id", "POST", "/knn-service", json.dumps({**ok, "id": "/etc/passwd"}).encode()),
        ("a path in the thumbnail URL", "GET", "/thumbnail/image/..%2F..%2Fetc%2Fpasswd", None),
        ("a source path in the thumbnail URL", "GET", f"/thumbnail/image/{collection['images'][0]}", None),
        ("an id outside the index", "GET", f"/thumbnail/image/{NUM_ITEMS}", None),
        ("bytes that are no image", "POST", "/knn-service",
         json.dumps({**ok, "image": base64.b64encode(b"GIF89a not really").decode()}).encode()),
        ("a bomb PNG (30000 x 30000)", "POST", "/knn-service",
         json.dumps({**ok, "image": base64.b64encode(_bomb_png(30_000, 30_000)).decode()}).encode()),
        ("a PNG over the pixel limit (8000 x 8000)", "POST", "/knn-service",
         json.dumps({**ok, "image": base64.b64encode(_bomb_png(8_000, 8_000)).decode()}).encode()),
        ("huge base64", "POST", "/knn-service",
         b'{"image": "' + b"A" * (limits.max_body_bytes + 2**20) + b'"}'),
        ("an embedding of the wrong size", "POST", "/knn-service",
         json.dumps({**ok, "embedding_input": [1.0, 2.0]}).encode()),
        ("an embedding of NaN", "POST", "/knn-service", b'{"embedding_input": [NaN], "num_images": 3}'),
        ("metadata ids outside", "POST", "/metadata", json.dumps({"ids": [0, 10**12]}).encode()),
        ("metadata ids not a list", "POST", "/metadata", json.dumps({"ids": "0"}).encode()),
        ("GET on a POST route", "GET", "/knn-service", None),
    ]


def test_load_then_bad_requests_then_healthz(collection, server):
    checkpoint, images = collection["checkpoint"], collection["images"]
    texts = [f"{caption} seen from far away" for caption in collection["captions"]]
    queries = np.concatenate([direct_text_embeddings(checkpoint, texts).numpy(),
                              direct_image_embeddings(checkpoint, images[:6]).numpy()])
    expected, _ = brute_force(collection, queries, "image", 5)
    distinct = [{"text": text} for text in texts] + [{"image": _image_base64(path)} for path in images[:6]]
    distinct += [{"embedding_input": vector.tolist()} for vector in queries[:8]]
    expected = [*expected, *expected[:8]]
    bodies = [{**distinct[i % len(distinct)], "indice_name": "index", "num_images": 5, "modality": "image"}
              for i in range(LOAD_QUERIES)]
    report = run_load(server, bodies, concurrency=8, max_seconds=120)
    print(f"\nload against {server}: {report.summary()}")
    assert report.sent == LOAD_QUERIES and report.errors == []
    for i, (status, results) in enumerate(report.responses):  # concurrent answers are the sequential ones
        assert status == 200 and [result["id"] for result in results] == expected[i % len(distinct)].tolist()

    for description, method, path, body in _bad_requests(collection):
        status, answer = request(server, method, path, body)
        assert 400 <= status < 500, f"{description}: status {status}, {answer!r:.200}"
        assert isinstance(answer, dict) and answer["error"], description
        assert request(server, "GET", "/healthz")[0] == 200, f"the server stopped answering after: {description}"
    status, results = request(server, "POST", "/knn-service", json.dumps(bodies[0]).encode())
    assert status == 200 and [result["id"] for result in results] == expected[0].tolist()

    status, metrics = request(server, "GET", "/metrics")
    text = metrics.decode()
    assert status == 200 and f'openalign_query_latency_seconds_count{{query="text"}} {len(texts) * 0 + 1}' not in text
    counted = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith("openalign_queries_total{"))
    assert counted >= LOAD_QUERIES + 1  # every answered query, whatever its kind
    assert 'openalign_refused_requests_total{status="400"}' in text


def test_application_in_process(collection):
    checkpoint, images = collection["checkpoint"], collection["images"]
    without_model = create_app(collection["index"]).test_client()
    status = without_model.post("/knn-service", json={"text": "a dog"})
    assert status.status_code == 400 and "without a model" in status.json["error"]
    # An item's own stored vector finds it first, with a similarity of 1 (float16 storage).
    hits = without_model.post("/knn-service", json={"id": 9, "num_images": 3, "modality": "text"}).json
    assert hits[0]["id"] == 9 and hits[0]["similarity"] == pytest.approx(1.0, abs=2e-3)
    assert without_model.get("/healthz").json["indexes"]["text"]["vectors"] == NUM_ITEMS

    small = ServeLimits(max_upload_bytes=1000, max_num_images=3)
    app = create_app(collection["index"], load_encoders(checkpoint), name="photos", limits=small).test_client()
    assert app.get("/indices-list").json == ["photos"]
    big = app.post("/knn-service", json={"image": _image_base64(images[0]), "num_images": 2})  # over 1000 bytes
    assert big.status_code == 413 and "1000 bytes" in big.json["error"]
    assert app.post("/knn-service", json={"text": "a", "num_images": 4}).status_code == 400
    answered = app.post("/knn-service", data=json.dumps({"text": "a dog", "num_images": 3, "indice_name": "photos"}))
    assert answered.status_code == 200 and len(answered.json) == 3
    metrics = app.get("/metrics").data.decode()
    assert 'openalign_queries_total{modality="image",query="text"} 1.0' in metrics
    assert 'openalign_query_latency_seconds_count{query="text"} 1.0' in metrics
    assert 'openalign_refused_requests_total{status="413"} 1.0' in metrics
    page = app.get("/")
    assert page.status_code == 200 and b'id="results"' in page.data
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    for name in ("index.html", "app.js", "style.css"):  # nothing is fetched from elsewhere
        body = app.get("/" if name == "index.html" else f"/static/{name}").data.decode()
        assert "http://" not in body and "https://" not in body and "//cdn" not in body


def test_deduplication_equals_clip_retrieval():
    clip_back = clip_retrieval_module("clip_back")
    knn_service = object.__new__(clip_back.KnnService)  # its methods need no index or model
    rng = np.random.default_rng(0)
    base = rng.standard_normal((6, 16)).astype(np.float32)
    # Chains and groups of near copies (A ~ B ~ C with A and C further apart), and distinct vectors.
    vectors = np.concatenate([base, base[:3] + 0.15 * rng.standard_normal((3, 16)).astype(np.float32),
                              base[:1] + 0.3 * rng.standard_normal((2, 16)).astype(np.float32)])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    expected = set(knn_service.connected_components_dedup(vectors))
    assert expected and set(duplicate_positions(vectors).tolist()) == expected


CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")


def _browser(profile: Path):
    """Debian's headless chromium through chromedriver. Skips without them, but fails when
    OPENALIGN_REQUIRE_BROWSER=1 (CI installs them, so a skip there would hide a broken page)."""
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    try:
        from selenium import webdriver
    except ImportError:
        webdriver = None
    missing = [name for name, found in (("chromium", chromium), ("chromium-driver", chromedriver),
                                        ("selenium", webdriver)) if not found]
    if missing:
        message = (f"the page test needs {', '.join(missing)} "
                   "(apt-get install chromium chromium-driver; pip install selenium)")
        if os.environ.get("OPENALIGN_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1200,900"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=chromedriver))


def _tile_ids(driver) -> list[int]:
    from selenium.webdriver.common.by import By

    return [int(link.get_attribute("data-id")) for link in driver.find_elements(By.CSS_SELECTOR, "#results .tile a")]


def _drop_file(driver, path: Path) -> None:
    """Drop a file on the page as a user's drag and drop does: a drop event whose DataTransfer holds it."""
    driver.execute_script(
        """const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], arguments[1], { type: "image/png" }));
        document.dispatchEvent(new DragEvent("dragenter", { dataTransfer: transfer, bubbles: true }));
        document.dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true }));""",
        _image_base64(path), path.name,
    )


def test_page_in_headless_chromium(collection, server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    checkpoint, images = collection["checkpoint"], collection["images"]
    text = "a red bicycle in the street"
    text_order, text_scores = brute_force(collection, direct_text_embeddings(checkpoint, [text]).numpy(), "image",
                                          NUM_ITEMS)
    driver = _browser(tmp_path / "profile")
    try:
        wait = WebDriverWait(driver, 30)
        status = lambda: driver.find_element(By.ID, "status").text  # noqa: E731

        def wait_for_results(first_id: int | None = None) -> list[int]:
            wait.until(lambda _: "results in" in status() and (first_id is None or _tile_ids(driver)[:1] == [first_id]))
            return _tile_ids(driver)

        driver.get(f"{server}/")
        wait.until(lambda _: "Type a description" in status())
        # Type a query: tiles in brute-force order, with rank, similarity, caption and a loaded thumbnail.
        driver.find_element(By.ID, "query").send_keys(text, Keys.ENTER)
        assert wait_for_results() == text_order[0].tolist()
        first = driver.find_element(By.CSS_SELECTOR, "#results .tile")
        assert first.find_element(By.CLASS_NAME, "rank").text == "#1"
        assert first.find_element(By.CLASS_NAME, "similarity").text == f"similarity {text_scores[0, 0]:.3f}"
        assert first.find_element(By.CLASS_NAME, "caption").text == collection["captions"][text_order[0, 0]]
        wait.until(lambda _: driver.execute_script(
            "return [...document.querySelectorAll('#results img')].every((i) => i.complete && i.naturalWidth > 0)"))
        assert parse_qs(urlsplit(driver.current_url).query)["q"] == [text]  # the query is in the address

        # Upload an image (the file input): it finds itself first, and the query image is shown.
        driver.find_element(By.ID, "upload").send_keys(str(images[11]))
        wait_for_results(first_id=11)
        assert driver.find_element(By.ID, "query-image").is_displayed()
        # Drag and drop another.
        _drop_file(driver, images[5])
        wait_for_results(first_id=5)

        # Click a result: search by it (the address holds its id), then by keyboard: Tab to a tile, Enter.
        target = driver.find_elements(By.CSS_SELECTOR, "#results .tile a")[2]
        target_id = int(target.get_attribute("data-id"))
        target.click()
        wait_for_results(first_id=target_id)
        assert parse_qs(urlsplit(driver.current_url).query)["id"] == [str(target_id)]
        label = lambda: driver.find_element(By.ID, "query-label").text  # noqa: E731
        target_label = f"Items like “{collection['captions'][target_id]}” (item {target_id})"
        assert label() == target_label
        by_keyboard = driver.find_elements(By.CSS_SELECTOR, "#results .tile a")[1]
        keyboard_id = int(by_keyboard.get_attribute("data-id"))
        by_keyboard.send_keys(Keys.ENTER)
        wait_for_results(first_id=keyboard_id)
        driver.find_element(By.TAG_NAME, "body").send_keys("/")
        assert driver.switch_to.active_element.get_attribute("id") == "query"
        driver.back()  # the previous search comes back with the address, and its caption from /metadata
        wait_for_results(first_id=target_id)
        wait.until(lambda _: label() == target_label)

        # A shared address runs its search on load; at a phone's width nothing scrolls sideways.
        driver.set_window_size(390, 844)
        driver.get(f"{server}/?q={quote(text)}")
        assert wait_for_results() == text_order[0].tolist()
        assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
        screenshot = tmp_path / "page.png"
        assert driver.save_screenshot(str(screenshot))
        assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        driver.quit()
