"""Hostile and careless inputs: each gets a typed error naming the file, key, line or value, or a counted skip;
no command prints a traceback for user input; nothing outside the intended folder is read or written; nothing
from a data file, run folder or checkpoint executes. Every input is small, so the whole battery runs in well
under two minutes (the training half is tests/test_hostile_training.py)."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import threading
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from openalign.cli import main
from openalign.data.dataset import ImageTextDataset, make_loader, train_transform
from openalign.data.sources import DataError, Record, iter_manifest, iter_records, iter_shard, write_shards
from openalign.errors import CheckpointError, InputLimitError, OpenAlignError, TextInputError
from openalign.index.html import thumbnail_data_uri
from openalign.inference.embed import EmbeddingFolderError
from openalign.models.align import AlignModel
from openalign.processing.tokenizer import AlignTokenizer, train_wordpiece
from openalign.untrusted import MAX_IMAGE_BYTES, MAX_TEXT_BYTES
from tests.cli_fixtures import CAPTIONS, make_images

REPOSITORY = Path(__file__).resolve().parents[1]


def small_transform(image, generator=None):
    return train_transform(image, resize=12, crop=9, generator=generator)


def png_bytes(index: int = 0, size=(8, 6)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (index * 40 % 256, 90, 20)).save(buffer, format="PNG")
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A few hundred bytes whose PNG header declares width x height (a decompression bomb by its header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND",
                                                                                                            b"")


def add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def run_command(argv: list[str], capsys) -> tuple[int, str]:
    """Exit status and stderr of one command run in this process, after checking the error is one line with
    no traceback."""
    capsys.readouterr()
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse's usage errors
        status = exit_.code
    error = capsys.readouterr().err
    assert "Traceback" not in error
    return status, error


def assert_skips(source, skipped: dict[str, int], captions: list[str]) -> None:
    """One epoch of a training dataset over source, as long as its usable samples: it yields exactly `captions`
    and counts exactly `skipped`."""
    dataset = ImageTextDataset(source, transform=small_transform, shuffle=False, epoch_size=len(captions))
    loader = make_loader(dataset, batch_size=1)
    assert [caption for batch in loader for caption in batch["captions"]] == captions
    assert dict(loader.skipped) == skipped


@pytest.fixture(scope="module")
def index_folder(checkpoint, tmp_path_factory):
    """Six images, their embeddings in three parts, and an exact index over them."""
    root = tmp_path_factory.mktemp("hostile-index")
    make_images(root / "images", 6)
    assert main(["embed", str(root / "images"), "--model", str(checkpoint), "--out", str(root / "embeddings"),
                 "--part-size", "2", "--no-progress"]) == 0
    assert main(["index", str(root / "embeddings")]) == 0
    return root


# -- the entry point: one line, a non-zero exit, the traceback only on request --------------------------------


def test_errors_are_one_line_naming_the_culprit_and_a_non_zero_exit(tmp_path, capsys, monkeypatch):
    bad_config = tmp_path / "config.json"
    bad_config.write_text(json.dumps({"text_config": {"num_hidden_layers": 2.5}}))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases = [
        (["summary", str(bad_config)], ["config.json", "num_hidden_layers"]),
        (["summary", "align-huge"], ["align-huge"]),
        (["train", "--config", str(tmp_path / "missing.yaml")], ["missing.yaml"]),
        (["tokenizer", "train", str(empty), "--vocab-size", "50", "--out", str(tmp_path / "tok")], ["empty.txt"]),
        (["tokenizer", "train", str(tmp_path / "absent.txt"), "--vocab-size", "50", "--out", str(tmp_path / "tok")],
         ["absent.txt"]),
        (["tokenizer", "train", str(empty), "--vocab-size", "3", "--out", str(tmp_path / "tok")], ["vocab_size"]),
        (["plot", str(tmp_path / "no-run")], ["no-run"]),
    ]
    for argv, names in cases:
        status, error = run_command(argv, capsys)
        assert status == 1, argv
        assert len(error.strip().splitlines()) == 1, error
        assert error.startswith(f"openalign {argv[0]}"), error
        assert all(name in error for name in names), error
    assert not (tmp_path / "tok").exists() or not any((tmp_path / "tok").iterdir())


def test_debug_flag_or_environment_shows_the_traceback(tmp_path, monkeypatch):
    bad_config = tmp_path / "config.json"
    bad_config.write_text("[1, 2]")
    for argv in (["--debug", "summary", str(bad_config)], ["summary", str(bad_config), "--debug"]):
        with pytest.raises(OpenAlignError, match="config.json"):
            main(argv)
    monkeypatch.setenv("OPENALIGN_DEBUG", "1")
    with pytest.raises(OpenAlignError):
        main(["summary", str(bad_config)])


def test_the_installed_command_exits_1_with_one_line(tmp_path):
    bad_config = tmp_path / "config.json"
    bad_config.write_text(json.dumps({"vision_config": None}))
    environment = {key: value for key, value in os.environ.items() if key != "OPENALIGN_DEBUG"}
    command = [shutil.which("openalign")] if shutil.which("openalign") else [sys.executable, "-m", "openalign"]
    finished = subprocess.run([*command, "summary", str(bad_config)], capture_output=True, text=True,
                              env=environment, timeout=120)
    assert finished.returncode == 1
    assert finished.stderr.count("\n") == 1 and "Traceback" not in finished.stderr, finished.stderr
    assert "config.json" in finished.stderr and "vision_config" in finished.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_says_so(checkpoint, tmp_path, capsys):
    (image,) = make_images(tmp_path, 1)
    status, error = run_command(["zero-shot", str(image), "--labels", "dog", "-m", str(checkpoint), "--device",
                                 "cuda"], capsys)
    assert status == 1 and "no CUDA device" in error and len(error.strip().splitlines()) == 1


def test_resume_latest_alone_never_reads_the_current_folder(tmp_path, capsys, monkeypatch):
    # A config.yaml that happens to lie in the current folder is not the run's: it must not even be parsed.
    monkeypatch.chdir(tmp_path)
    Path("config.yaml").write_text("data:\n  train: 'pipe:touch executed'\nnot_a_section: {}\n")
    status, error = run_command(["train", "--resume", "latest", "--run.progress", "false"], capsys)
    assert status == 1 and "config.yaml" not in error and "not_a_section" not in error, error
    assert not Path("executed").exists()


# -- item 2: metrics on a diverged model --------------------------------------------------------------------


def test_retrieval_refuses_nan_and_gives_a_collapsed_model_chance(capsys):
    from openalign.eval.retrieval import RetrievalInputError, retrieval_metrics

    with pytest.raises(RetrievalInputError, match="image_embeds .* row 0"):
        retrieval_metrics(np.full((4, 3), np.nan), np.ones((4, 3)), np.arange(4))
    collapsed = retrieval_metrics(np.ones((10, 3)), np.ones((10, 3)), np.arange(10))
    assert collapsed["image_to_text_r1"] == pytest.approx(0.1) and collapsed["text_to_image_r5"] == pytest.approx(0.5)


# -- item 3: every read of untrusted bytes is bounded ---------------------------------------------------------


def test_a_huge_caption_member_is_never_read_and_its_sample_is_a_counted_skip(tmp_path):
    shard = tmp_path / "web.tar.gz"
    with tarfile.open(shard, "w:gz") as archive:
        for index in range(3):
            add_member(archive, f"{index}.png", png_bytes(index))
            add_member(archive, f"{index}.txt", b"\0" * (16 * MAX_TEXT_BYTES) if index == 1 else b"a caption")
    assert shard.stat().st_size < 100_000  # a few KB on disk, 16 MB unpacked
    tracemalloc.start()
    records = list(iter_shard(str(shard)))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 * MAX_TEXT_BYTES, peak  # the member was never held, nor a chunk of it near its size
    assert [record.error is None for record in records] == [True, False, True]
    assert "1.txt" in records[1].error and str(16 * MAX_TEXT_BYTES) in records[1].error
    assert_skips(str(shard), {"over_limit": 1}, ["a caption", "a caption"])


def _open_in_thread(record: Record) -> BaseException | bytes:
    outcome = []

    def target():
        try:
            outcome.append(record.open_image_bytes())
        except BaseException as error:  # noqa: B036 - handed back to the test
            outcome.append(error)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout=20)
    assert not thread.is_alive(), f"reading {record.image_path} hangs"
    return outcome[0]


def test_image_files_that_are_devices_fifos_or_huge_are_refused_unread(tmp_path):
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    huge = tmp_path / "huge.png"
    with open(huge, "wb") as handle:
        handle.truncate(MAX_IMAGE_BYTES + 1)  # sparse: costs nothing on disk
    good = tmp_path / "good.png"
    good.write_bytes(png_bytes())
    rows = [{"image": path, "caption": f"row {index}"}
            for index, path in enumerate(["/dev/zero", str(fifo), str(huge), str(good)])]
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    records = list(iter_manifest(manifest))
    for record, reason in zip(records[:3], ["not a regular file", "not a regular file", "above the limit"]):
        outcome = _open_in_thread(record)
        assert isinstance(outcome, InputLimitError) and reason in str(outcome), outcome
        assert str(record.image_path) in str(outcome)
    assert _open_in_thread(records[3]) == png_bytes()
    assert_skips(manifest, {"over_limit": 3}, ["row 3"])


def test_an_oversized_caption_file_beside_an_image_is_a_counted_skip(tmp_path):
    for index in range(2):
        (tmp_path / f"{index}.png").write_bytes(png_bytes(index))
        (tmp_path / f"{index}.txt").write_text("fine" if index else "x" * (MAX_TEXT_BYTES + 1))
    records = list(iter_records(tmp_path))
    assert "0.txt" in records[0].error and records[1].error is None
    assert_skips(tmp_path, {"over_limit": 1}, ["fine"])


# -- item 5: one bad shard ------------------------------------------------------------------------------------


def _shards(folder: Path, count: int, per_shard: int = 3) -> list[Path]:
    records = [Record(key=str(index), caption=f"sample {index}", image_bytes=png_bytes(index), image_ext="png")
               for index in range(count * per_shard)]
    return [write_shards(records[start:start + per_shard], folder, prefix=f"part{start}")[0]
            for start in range(0, count * per_shard, per_shard)]


def test_a_truncated_shard_is_skipped_and_counted_at_the_start_too(tmp_path):
    shards = _shards(tmp_path / "shards", 4)
    data = shards[2].read_bytes()
    # Each member here is a 512-byte header and one 512-byte block of data: cut inside the fifth one's data, which
    # is where counting from the headers fails (a cut inside a header reads as a short tar).
    cut = 4 * 1024 + 512 + 100
    shards[2].write_bytes(data[:cut])
    dataset = ImageTextDataset(tmp_path / "shards", transform=small_transform, shuffle=False)
    assert dataset.num_samples == 9 and dataset.uncountable_shards == [str(shards[2])]
    loader = make_loader(dataset, batch_size=1)
    captions = [caption for batch in loader for caption in batch["captions"]]
    assert len(captions) == 9 and loader.skipped["unreadable_shard"] >= 1
    for shard in shards:
        shard.write_bytes(data[:cut])
    with pytest.raises(DataError, match="none of the 4 shards"):
        _ = ImageTextDataset(tmp_path / "shards", transform=small_transform).num_samples


def test_a_deeply_nested_json_sidecar_is_a_counted_skip(tmp_path):
    shard = tmp_path / "nested.tar"
    with tarfile.open(shard, "w") as archive:
        for index in range(3):
            add_member(archive, f"{index}.png", png_bytes(index))
            add_member(archive, f"{index}.txt", f"caption {index}".encode())
            sidecar = "[" * 100_000 + "]" * 100_000 if index == 1 else json.dumps({"width": 8})
            add_member(archive, f"{index}.json", sidecar.encode())
    records = list(iter_shard(str(shard)))
    assert "1" in records[1].error and "nested" in records[1].error
    assert_skips(str(shard), {"over_limit": 1}, ["caption 0", "caption 2"])


# -- items 6 and 9: what a model folder may say -----------------------------------------------------------------


@pytest.mark.parametrize("outside", ["relative", "absolute"])
def test_a_shard_index_cannot_name_a_file_outside_its_folder(checkpoint, tmp_path, outside):
    folder = tmp_path / "model"
    shutil.copytree(checkpoint, folder)
    (tmp_path / "other").mkdir()
    elsewhere = (tmp_path / "other" / "model.safetensors")
    (folder / "model.safetensors").rename(elsewhere)
    name = "../other/model.safetensors" if outside == "relative" else str(elsewhere)
    from safetensors import safe_open

    with safe_open(elsewhere, "pt") as weights:
        keys = list(weights.keys())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {key: name for key in keys}}))
    with pytest.raises(CheckpointError, match="not a file inside"):
        AlignModel.from_pretrained(folder)


@pytest.mark.parametrize("config, field", [
    ({"text_config": {"num_hidden_layers": 2.5}}, "num_hidden_layers"),
    ({"vision_config": None}, "vision_config"),
    ({"vision_config": [1, 2]}, "vision_config"),
    ([{"model_type": "align"}], "JSON object"),
    ({"vision_config": {"kernel_sizes": "abc"}}, "kernel_sizes"),
    ({"text_config": {"vocab_size": 10**12}}, "vocab_size"),
    ({"text_config": {"hidden_dropout_prob": float("nan")}}, "hidden_dropout_prob"),
])
def test_config_json_types_and_sizes_are_checked_before_anything_is_built(tmp_path, config, field):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=field) as raised:
        AlignModel.from_pretrained(tmp_path)
    assert "config.json" in str(raised.value)


# -- item 10: the tokenizer -------------------------------------------------------------------------------------


class _CountingTokenizer:
    """Stands in for the Rust tokenizer, counting the characters it is asked to encode."""

    def __init__(self, tokenizer):
        self.tokenizer, self.characters = tokenizer, 0

    def encode_batch(self, texts, **options):
        self.characters += sum(len(text) for text in texts)
        return self.tokenizer.encode_batch(texts, **options)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_a_10_mb_caption_is_tokenized_from_a_bounded_prefix(checkpoint):
    tokenizer = AlignTokenizer.from_pretrained(checkpoint, max_length=64)
    words = " ".join(CAPTIONS).split()
    caption = " ".join(words[index % len(words)] for index in range(2_000_000))[: 10 * 2**20]
    counting = _CountingTokenizer(tokenizer.tokenizer)
    tokenizer.tokenizer = counting
    ids = tokenizer(caption, padding="do_not_pad", return_tensors=None)["input_ids"][0]
    assert counting.characters < 20_000
    # Oracle: the whole of a prefix cut at a space (its tokens are the first tokens of the caption).
    prefix = caption[: caption.index(" ", 5000)]
    whole = counting.tokenizer.encode(prefix).ids
    assert ids == whole[:63] + whole[-1:]


def test_a_lone_surrogate_names_the_item_and_is_a_counted_skip_in_training(checkpoint, tmp_path):
    tokenizer = AlignTokenizer.from_pretrained(checkpoint)
    with pytest.raises(TextInputError, match="text item 1"):
        tokenizer(["a red square", "broken \ud800 text"])
    (tmp_path / "a.png").write_bytes(png_bytes())
    manifest = tmp_path / "train.jsonl"
    manifest.write_text('{"image": "a.png", "caption": "bad \\ud800"}\n{"image": "a.png", "caption": "fine"}\n')
    assert_skips(manifest, {"invalid_caption": 1}, ["fine"])


def test_an_empty_captions_file_is_refused_and_a_small_one_warned_about(tmp_path, caplog):
    empty = tmp_path / "captions.txt"
    empty.write_text("\n\n")
    with pytest.raises(TextInputError, match="captions.txt"):
        train_wordpiece(empty, vocab_size=100)
    with caplog.at_level("WARNING"):
        train_wordpiece(["a cat", "a dog"], vocab_size=1000, min_frequency=1)
    assert any("fewer than the 1000" in message for message in caplog.messages)
    caplog.clear()
    with caplog.at_level("WARNING"):  # a cap (the demo's) is not a request: nothing to warn about
        capped = train_wordpiece(["a cat", "a dog"], vocab_size=1000, min_frequency=1, cap=True)
    assert capped.vocab_size < 1000 and not caplog.messages


# -- item 11: search ------------------------------------------------------------------------------------------


def test_search_k_must_be_positive_and_a_missing_index_is_named(index_folder, capsys):
    index = str(index_folder / "embeddings" / "index")
    for k in ("0", "-5"):
        status, error = run_command(["search", index, "a dog", "-k", k], capsys)
        assert status == 1 and "k must be a positive" in error and k in error and len(error.strip().splitlines()) == 1
    missing = str(index_folder / "no-such-index")
    status, error = run_command(["search", missing, "a dog"], capsys)
    assert status == 1 and "no-such-index" in error and "model.json" not in error


def test_a_bomb_among_the_hits_is_a_grey_box_in_the_html_page(index_folder, capsys, tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_declaring(30000, 30000))
    assert thumbnail_data_uri(bomb) is None
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    assert thumbnail_data_uri(fifo) is None  # never opened, so never waited on
    # An indexed image replaced by a bomb after indexing: the page is still written.
    (index_folder / "images" / "image-000.png").write_bytes(png_declaring(30000, 30000))
    page = tmp_path / "page.html"
    status, _ = run_command(["search", str(index_folder / "embeddings" / "index"), "a dog", "-k", "6",
                             "--html", str(page)], capsys)
    assert status == 0 and page.read_text().count("<figure>") == 6


# -- item 12: manifests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, content, line", [
    ("rows.jsonl", b'{"image": "a.png", "caption": "x"}\n["a.png", "x"]\n', 2),
    ("nested.jsonl", b'{"image": "a.png", "caption": "x"}\n\n' + b"[" * 50_000 + b"]" * 50_000 + b"\n", 3),
    ("latin.jsonl", b'{"image": "a.png", "caption": "x"}\n{"image": "b.png", "caption": "caf\xe9"}\n', 2),
    ("latin.csv", b"image,caption\na.png,plain\nb.png,caf\xe9 cr\xe8me\n", 3),
    ("latin.tsv", "image\tcaption\ncafé.png\tx\n".encode("latin-1"), 2),
])
def test_manifest_errors_name_the_file_and_line(tmp_path, name, content, line):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=rf"{name}, line {line}:"):
        list(iter_manifest(path))


# -- item 13: a finished embedding folder damaged later ---------------------------------------------------------


def test_a_part_removed_after_embedding_is_named_by_index_and_redone_by_a_rerun(checkpoint, tmp_path, capsys):
    from openalign.index.faiss_index import build_index

    images = make_images(tmp_path / "images", 5)
    command = ["embed", str(tmp_path / "images"), "--model", str(checkpoint), "--out", str(tmp_path / "embeddings"),
               "--part-size", "2", "--no-progress"]
    assert main(command) == 0
    removed = tmp_path / "embeddings" / "img_emb" / "img_emb_00001.npy"
    original = removed.read_bytes()
    removed.unlink()
    with pytest.raises(EmbeddingFolderError, match="img_emb_00001.npy"):
        build_index(tmp_path / "embeddings", tmp_path / "index")
    truncated = tmp_path / "embeddings" / "metadata" / "metadata_00002.parquet"
    truncated.write_bytes(truncated.read_bytes()[:-10])
    assert main(command) == 0  # the rerun notices both and redoes those parts
    assert removed.read_bytes() == original
    plan = build_index(tmp_path / "embeddings", tmp_path / "index")
    assert plan.num_vectors == len(images)


# -- item 15: the rendezvous store ------------------------------------------------------------------------------


def test_the_docs_say_how_to_keep_a_single_machine_run_off_the_network():
    for path in (REPOSITORY / "README.md", REPOSITORY / "docs" / "training.md"):
        text = path.read_text()
        assert "all interfaces" in text and "unshare --net" in text, path
