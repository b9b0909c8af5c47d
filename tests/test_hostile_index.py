"""Index folders under attack and accident: rebuilt while served, truncated, flipped, on a full disk; embedding
parts with a flipped byte; an index searched with another model, moved with its model, or whose model is gone.
Each case must end in the old or the new answers, or in one clear error naming the file: never wrong answers,
a SIGBUS or a traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import threading

import faiss
import numpy as np
import pytest

from openalign.files import DiskFullError, allocate_file
from openalign.index.faiss_index import Index, IndexBuildError, build_index, verify_index
from openalign.inference.embedding_folder import EmbeddingFolderError
from tests.test_index_faiss import _clustered, _embed_folder, _exact, _recall

faiss.omp_set_num_threads(1)  # the test machine's cores are shared


def _collection(folder, seed, count=12_000, dim=32):
    rng = np.random.default_rng(seed)
    return _embed_folder(folder, _clustered(rng.standard_normal((64, dim)), count, rng), part_size=3000)


@pytest.fixture(scope="module")
def two_collections(tmp_path_factory):
    """Two embedding folders of the same size and dimension but other vectors, and queries."""
    root = tmp_path_factory.mktemp("collections")
    vectors = {name: _collection(root / name, seed) for seed, name in enumerate(("first", "second"), start=1)}
    queries = np.random.default_rng(3).standard_normal((20, 32)).astype(np.float32)
    exact = {name: _exact(database, queries, 10)[1] for name, database in vectors.items()}
    return root / "first", root / "second", queries, exact


# -- 25.3: a served index rebuilt in place ------------------------------------------------------------------------


def test_an_index_rebuilt_under_a_loaded_one_keeps_its_answers(two_collections, tmp_path):
    first, second, queries, exact = two_collections
    build_index(first, tmp_path / "index", kind="ivfpq")
    served = Index.load(tmp_path / "index", memory_map=True)
    old_ids = served.search_vectors(queries, 10)[1]
    wrong, stop = [], threading.Event()

    def keep_searching():
        while not stop.is_set():
            ids = served.search_vectors(queries, 10)[1]
            if not np.array_equal(ids, old_ids):
                wrong.append(ids)

    searcher = threading.Thread(target=keep_searching)
    searcher.start()
    try:
        build_index(second, tmp_path / "index", kind="ivfpq")  # into the folder being read
    finally:
        stop.set()
        searcher.join()
    assert not wrong
    np.testing.assert_array_equal(served.search_vectors(queries, 10)[1], old_ids)
    # The old answers are the first collection's neighbours, a new load's the second's (the queries are random
    # directions, not of either collection's clusters: an approximate search finds most of their neighbours).
    new_ids = Index.load(tmp_path / "index").search_vectors(queries, 10)[1]
    assert _recall(old_ids, exact["first"]) >= 0.6 and _recall(new_ids, exact["second"]) >= 0.6
    assert _recall(old_ids, exact["second"]) < 0.1
    assert not list(tmp_path.glob(".index.*"))  # nothing left beside it


def test_a_server_process_survives_a_rebuild_by_the_command(two_collections, tmp_path):
    first, second, queries, _ = two_collections
    build_index(first, tmp_path / "index", kind="ivfpq")
    np.save(tmp_path / "queries.npy", queries)
    # A reader process that searches until told to stop, and says whether any answer changed.
    reader = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, numpy as np
        from openalign.index.faiss_index import Index
        index = Index.load("{tmp_path / 'index'}", memory_map=True)
        queries = np.load("{tmp_path / 'queries.npy'}")
        expected = index.search_vectors(queries, 10)[1]
        print("ready", flush=True)
        changed = searches = 0
        while sys.stdin.readline().strip() != "stop":
            for _ in range(20):
                changed += not np.array_equal(index.search_vectors(queries, 10)[1], expected)
                searches += 1
            print("again", flush=True)
        print("changed", changed, "of", searches, flush=True)
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert reader.stdout.readline().strip() == "ready"
    builder = subprocess.Popen([sys.executable, "-m", "openalign", "index", str(second), "--out",
                                str(tmp_path / "index"), "--kind", "ivfpq"], stdout=subprocess.PIPE, text=True)
    while builder.poll() is None:
        reader.stdin.write("go\n")
        reader.stdin.flush()
        assert reader.stdout.readline().strip() == "again"
    reader.stdin.write("stop\n")
    reader.stdin.flush()
    last = reader.stdout.readline().split()
    assert reader.wait(timeout=60) == 0 and builder.returncode == 0  # no SIGBUS (-7)
    assert last[:2] == ["changed", "0"] and int(last[3]) > 0


# -- 25.10: files.json, and counts checked at load ----------------------------------------------------------------


@pytest.fixture(scope="module")
def built(two_collections, tmp_path_factory):
    folder = tmp_path_factory.mktemp("built") / "index"
    build_index(two_collections[0], folder, kind="ivfpq")
    return folder


@pytest.fixture
def damaged(built, tmp_path):
    folder = tmp_path / "index"
    shutil.copytree(built, folder)
    return folder


def test_a_built_folder_records_its_files_and_verifies(built, capsys):
    listing = json.loads((built / "files.json").read_text())
    assert set(listing["sizes"]) == set(listing["sha256"]) == {"index.faiss", "index.json", "metadata.arrow",
                                                               "lists.ivfdata", "vectors.npy"}
    assert len(verify_index(built)) == 12_000
    from openalign.cli import main

    assert main(["index", "--verify", str(built)]) == 0
    assert "every file matches" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["lists.ivfdata", "vectors.npy", "metadata.arrow", "index.faiss"])
def test_a_truncated_or_missing_file_is_named_at_load(damaged, name):
    path = damaged / name
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)
    with pytest.raises(IndexBuildError, match=f"{name} has .* bytes, .* were written"):
        Index.load(damaged)
    path.unlink()
    with pytest.raises(IndexBuildError, match=f"{name} is missing"):
        Index.load(damaged)


def test_a_flipped_byte_is_found_by_verify(damaged):
    path = damaged / "vectors.npy"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))
    Index.load(damaged)  # sizes agree: a load does not read every byte
    with pytest.raises(IndexBuildError, match="vectors.npy does not match the SHA-256"):
        verify_index(damaged)
    completed = subprocess.run([sys.executable, "-m", "openalign", "index", "--verify", str(damaged)],
                               capture_output=True, text=True)
    assert completed.returncode != 0 and "vectors.npy does not match" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_files_that_disagree_with_each_other_are_refused_without_a_record(damaged):
    # A folder without files.json (written before it existed) is still checked for its counts.
    (damaged / "files.json").unlink()
    vectors = np.load(damaged / "vectors.npy")
    np.save(damaged / "vectors.npy", vectors[:-5])
    with pytest.raises(IndexBuildError, match=r"vectors.npy holds \(11995, 32\) vectors, the index \(12000, 32\)"):
        Index.load(damaged)
    np.save(damaged / "vectors.npy", vectors)
    with open(damaged / "lists.ivfdata", "r+b") as handle:
        handle.truncate(1000)
    with pytest.raises(IndexBuildError, match="lists.ivfdata: 1000 bytes"):
        Index.load(damaged)


def test_a_folder_that_is_not_an_index_is_never_replaced(two_collections, tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"not an index")
    with pytest.raises(IndexBuildError, match="is not an index folder"):
        build_index(two_collections[0], tmp_path / "photos")
    assert (tmp_path / "photos" / "cat.jpg").read_bytes() == b"not an index"


# -- 25.18: embedding parts checked by SHA-256 --------------------------------------------------------------------


def test_a_flipped_byte_in_an_embedding_part_stops_the_build(two_collections, tmp_path):
    embeddings = tmp_path / "embeddings"
    shutil.copytree(two_collections[0], embeddings)
    part = embeddings / "text_emb" / "text_emb_00002.npy"
    data = bytearray(part.read_bytes())
    data[-101] ^= 0x01  # one bit of one float16: the same size, another vector
    part.write_bytes(bytes(data))
    with pytest.raises(EmbeddingFolderError, match="text_emb_00002.npy does not match the SHA-256"):
        build_index(embeddings, tmp_path / "index")
    assert not (tmp_path / "index").exists()


# -- 25.9: a full disk --------------------------------------------------------------------------------------------


def test_allocation_on_a_full_disk_is_a_disk_full_error():
    with pytest.raises(DiskFullError, match="while writing /dev/full"):
        allocate_file("/dev/full", 10**6)


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare for a small file system of its own")
def test_an_index_build_on_a_full_file_system_says_so(two_collections, tmp_path):
    # A 1 MB tmpfs of its own: the float16 copy of 12,000 x 32 vectors (768 KB) and the lists do not both fit.
    (tmp_path / "disk").mkdir()
    command = (f"mount -t tmpfs -o size=1m tmpfs {tmp_path}/disk && {sys.executable} -m openalign index "
               f"{two_collections[0]} --out {tmp_path}/disk/index --kind ivfpq")
    finished = subprocess.run(["unshare", "--map-root-user", "--mount", "sh", "-c", command],
                              capture_output=True, text=True, timeout=300)
    if "mount" in finished.stderr and "no space" not in finished.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {finished.stderr.strip()[:200]}")
    assert finished.returncode == 1, (finished.returncode, finished.stderr[-2000:])  # not -7: no SIGBUS
    assert "no space left on device" in finished.stderr and "Traceback" not in finished.stderr
    assert len(finished.stderr.strip().splitlines()) == 1
