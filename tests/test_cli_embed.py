"""`openalign embed`: embeddings equal the model called directly, unreadable files are skipped and listed, a
SIGKILLed run resumes to the bytes of an uninterrupted one, and torchrun with 2 ranks embeds every item once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from openalign.cli import main
from openalign.data.sources import Record, write_manifest, write_shards
from openalign.inference.embedding_folder import read_embedding_folder
from tests.cli_fixtures import CAPTIONS, direct_image_embeddings, direct_text_embeddings, make_images


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def _environment() -> dict[str, str]:
    # One thread per process: the machine is shared, and the bytes must not depend on thread scheduling.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def test_folder_embeddings_metadata_and_skipped_files(checkpoint, tmp_path, capsys):
    images = tmp_path / "images"
    paths = make_images(images, 5) + make_images(images / "nested", 2, seed=1, size=(48, 30))
    (images / "broken.png").write_bytes(b"not a png")
    main(["embed", str(images), "--model", str(checkpoint), "--out", str(tmp_path / "out"), "--part-size", "3",
          "--batch-size", "2", "--no-progress"])
    output = capsys.readouterr().out
    assert "embedded 7 items" in output and "skipped 1" in output and "broken.png" in output

    embeddings, metadata = read_embedding_folder(tmp_path / "out")
    # Folder order is sorted recursively: broken.png, image-000..004, nested/image-000..001.
    expected_paths = sorted([images / "broken.png", *paths])
    readable = [path for path in expected_paths if path.name != "broken.png"]
    assert metadata.column("source").to_pylist() == [str(path) for path in readable]
    assert metadata.column("index").to_pylist() == [expected_paths.index(path) for path in readable]
    assert metadata.column("width").to_pylist() == [48 if "nested" in str(p) else 40 for p in readable]
    assert metadata.column("height").to_pylist() == [30 if "nested" in str(p) else 40 for p in readable]
    assert embeddings.dtype == np.float16
    oracle = direct_image_embeddings(checkpoint, readable).numpy()
    np.testing.assert_allclose(embeddings.astype(np.float32), oracle, atol=2e-3)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [entry["source"] for entry in summary["skipped"]] == [str(images / "broken.png")]
    record = json.loads((tmp_path / "out" / "model.json").read_text())  # relative, so a moved pair keeps working
    assert record["absolute"] == str(checkpoint.resolve())
    assert (tmp_path / "out" / record["model"]).resolve() == checkpoint.resolve()


def test_texts_from_a_caption_file_and_both_kinds_from_a_manifest(checkpoint, tmp_path):
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(CAPTIONS[:5]) + "\n\n")
    # A .txt of captions is embedded as texts without being told (--kind auto).
    main(["embed", str(captions), "--model", str(checkpoint), "--out", str(tmp_path / "texts"), "--no-progress"])
    embeddings, metadata = read_embedding_folder(tmp_path / "texts")
    assert metadata.column("caption").to_pylist() == CAPTIONS[:5]
    oracle = direct_text_embeddings(checkpoint, CAPTIONS[:5]).numpy()
    np.testing.assert_allclose(embeddings.astype(np.float32), oracle, atol=2e-3)

    paths = make_images(tmp_path / "images", 4)
    manifest = write_manifest([Record(key=str(p), caption=c, image_path=p) for p, c in zip(paths, CAPTIONS)],
                              tmp_path / "pairs.csv")
    # What a first attempt that failed before finishing a part leaves (other settings, no .done marker) does not
    # stand in the way of the corrected command.
    (tmp_path / "both").mkdir()
    (tmp_path / "both" / "embed_config.json").write_text(json.dumps({"kinds": ["image"], "part_size": 3}))
    main(["embed", str(manifest), "--kind", "both", "--model", str(checkpoint), "--out", str(tmp_path / "both"),
          "--no-progress"])
    assert json.loads((tmp_path / "both" / "embed_config.json").read_text())["kinds"] == ["image", "text"]
    image_embeddings, _ = read_embedding_folder(tmp_path / "both", "image")
    text_embeddings, metadata = read_embedding_folder(tmp_path / "both", "text")
    assert metadata.column("caption").to_pylist() == CAPTIONS[:4]
    np.testing.assert_allclose(image_embeddings.astype(np.float32), direct_image_embeddings(checkpoint, paths),
                               atol=2e-3)
    np.testing.assert_allclose(text_embeddings.astype(np.float32), direct_text_embeddings(checkpoint, CAPTIONS[:4]),
                               atol=2e-3)


def _shard_sources(tmp_path: Path) -> tuple[list[str], Path]:
    """Two shards of 10 samples (one broken); the second is read through a pipe that waits for a go file, so
    a run can be caught with some parts done and one half-read."""
    paths = make_images(tmp_path / "images", 20, suffix=".jpg")
    records = [Record(key=p.name, caption=CAPTIONS[i % len(CAPTIONS)], image_path=p, image_ext="jpg")
               for i, p in enumerate(paths)]
    records[13] = Record(key="broken", caption="broken", image_bytes=b"not a jpeg", image_ext="jpg")
    shards = write_shards(records, tmp_path / "shards", samples_per_shard=10)
    go = tmp_path / "go"
    waiter = tmp_path / "wait_then_cat.sh"
    waiter.write_text('while [ ! -e "$1" ]; do sleep 0.05; done\ncat "$2"\n')
    return [str(shards[0]), f"pipe:sh {waiter} {go} {shards[1]}"], go


def _embed_command(checkpoint, sources, out: Path) -> list[str]:
    return [sys.executable, "-m", "openalign", "embed", *sources, "--model", str(checkpoint), "--out", str(out),
            "--part-size", "4", "--batch-size", "2", "--no-progress"]


def test_sigkill_then_rerun_gives_the_bytes_of_an_uninterrupted_run(checkpoint, tmp_path):
    sources, go = _shard_sources(tmp_path)
    go.touch()
    subprocess.run(_embed_command(checkpoint, sources, tmp_path / "straight"), check=True, env=_environment(),
                   capture_output=True, timeout=300)
    go.unlink()

    killed = tmp_path / "killed"
    process = subprocess.Popen(_embed_command(checkpoint, sources, killed), env=_environment(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        # Parts 0 and 1 come from the first shard; part 2 waits on the pipe, half read.
        while not (killed / "part-00001.done").exists():
            assert process.poll() is None and time.monotonic() < deadline, "embed ended or stalled before part 1"
            time.sleep(0.02)
        time.sleep(0.3)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the session holds the embed process and the pipe's shell
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (killed / "part-00002.done").exists() and not (killed / "summary.json").exists()
    first_part = os.stat(killed / "img_emb" / "img_emb_00000.npy")

    go.touch()
    subprocess.run(_embed_command(checkpoint, sources, killed), check=True, env=_environment(), capture_output=True,
                   timeout=300)
    # skipped, not redone
    assert os.stat(killed / "img_emb" / "img_emb_00000.npy").st_mtime_ns == first_part.st_mtime_ns
    resumed, straight = _folder_bytes(killed), _folder_bytes(tmp_path / "straight")
    assert sorted(resumed) == sorted(straight)
    assert any(name.endswith(".npy") for name in straight) and any(name.endswith(".parquet") for name in straight)
    for name in straight:
        assert resumed[name] == straight[name], name
    assert json.loads(straight["summary.json"])["count"] == 19


def test_torchrun_two_ranks_embed_every_item_exactly_once(checkpoint, tmp_path):
    images = tmp_path / "images"
    make_images(images, 13)
    (images / "image-005.png").write_bytes(b"broken")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "openalign", "embed", str(images), "--model", str(checkpoint), "--out", str(tmp_path / "ranks"),
               "--part-size", "3", "--batch-size", "2", "--no-progress"]
    result = subprocess.run(command, env=_environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0 of 2" in result.stdout and "rank 1 of 2" in result.stdout

    parts = sorted((tmp_path / "ranks" / "metadata").glob("metadata_*.parquet"))
    indices = [index for part in parts for index in pq.read_table(part).column("index").to_pylist()]
    assert sorted(indices) == [index for index in range(13) if index != 5]  # each readable item exactly once
    assert len(parts) == 5

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank ran
    try:
        main(["embed", str(images), "--model", str(checkpoint), "--out", str(tmp_path / "single"), "--part-size",
              "3", "--batch-size", "2", "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    assert _folder_bytes(tmp_path / "ranks") == _folder_bytes(tmp_path / "single")
