"""Manifest, shard and folder readers against the files they were written from."""

import io
import itertools
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from openalign.data.sources import (
    DataError,
    Record,
    Shard,
    count_shard_samples,
    expand_shards,
    iter_manifest,
    iter_records,
    iter_shard,
    write_manifest,
    write_shards,
)


def png_bytes(index: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (6, 5), (index * 30 % 256, 100, 7)).save(buffer, format="PNG")
    return buffer.getvalue()


def make_image_records(folder: Path, count: int) -> list[Record]:
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(count):
        path = folder / f"{index}.png"
        path.write_bytes(png_bytes(index))
        records.append(Record(key=str(index), caption=f"caption {index}", image_path=path,
                              extra={"score": index}))
    return records


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_manifest_round_trip_resolves_relative_paths(tmp_path, suffix):
    records = make_image_records(tmp_path / "images", 4)
    manifest = write_manifest(records, tmp_path / "meta" / f"train{suffix}")
    back = list(iter_manifest(manifest))
    assert [record.key for record in back] == [f"../images/{index}.png" for index in range(4)]
    assert [record.caption for record in back] == [record.caption for record in records]
    assert [record.open_image_bytes() for record in back] == [png_bytes(index) for index in range(4)]
    # csv/tsv carry every value as text; jsonl/parquet keep the integer.
    assert [str(record.extra["score"]) for record in back] == ["0", "1", "2", "3"]


def test_manifest_names_file_and_columns_when_none_fits(tmp_path):
    manifest = write_manifest([{"picture": "a.png", "words": "x"}], tmp_path / "odd.csv")
    with pytest.raises(DataError, match=r"odd\.csv.*\['picture', 'words'\]"):
        list(iter_manifest(manifest))
    records = list(iter_manifest(manifest, image_column="picture", caption_column="words"))
    assert records[0].image_path == tmp_path / "a.png" and records[0].caption == "x"


def test_bytes_only_records_get_image_files_beside_the_manifest(tmp_path):
    records = [Record(key=f"k{index}", caption=f"c{index}", image_bytes=png_bytes(index), image_ext="png")
               for index in range(3)]
    manifest = write_manifest(records, tmp_path / "out.jsonl")
    back = list(iter_records(manifest))
    assert [record.open_image_bytes() for record in back] == [png_bytes(index) for index in range(3)]
    assert all(record.image_path.parent == tmp_path / "out_images" for record in back)


def test_brace_glob_and_folder_expansion(tmp_path):
    for index in range(12):
        (tmp_path / f"part-{index:03d}.tar").write_bytes(b"")
    expected = [Shard(str(tmp_path / f"part-{index:03d}.tar")) for index in range(2, 11)]
    assert expand_shards(str(tmp_path / "part-{002..010}.tar")) == expected
    assert expand_shards(str(tmp_path / "part-{000,005}.tar")) == [Shard(str(tmp_path / "part-000.tar")),
                                                                   Shard(str(tmp_path / "part-005.tar"))]
    everything = [Shard(str(tmp_path / f"part-{index:03d}.tar")) for index in range(12)]
    assert expand_shards(str(tmp_path)) == everything
    assert expand_shards(str(tmp_path / "part-*.tar")) == everything
    # Nested groups expand as the cartesian product, left group outermost.
    product = [Shard("cat " + a + b, command=True) for a, b in itertools.product("xy", ["1", "2", "3"])]
    assert expand_shards("pipe:cat {x,y}{1..3}") == product
    assert [str(shard) for shard in product[:1]] == ["pipe:cat x1"]
    with pytest.raises(DataError, match="part-012.tar"):
        expand_shards(str(tmp_path / "part-{011..012}.tar"))


def test_shard_round_trip_and_pipe(tmp_path):
    records = make_image_records(tmp_path / "images", 7)
    shards = write_shards(records, tmp_path / "shards", samples_per_shard=3)
    assert [path.name for path in shards] == ["shard-00000.tar", "shard-00001.tar", "shard-00002.tar"]
    assert [count_shard_samples(str(path)) for path in shards] == [3, 3, 1]
    back = list(iter_records(tmp_path / "shards"))
    assert [record.caption for record in back] == [record.caption for record in records]
    assert [record.image_bytes for record in back] == [png_bytes(index) for index in range(7)]
    assert [record.extra["key"] for record in back] == [record.key for record in records]
    assert back[4].key == "shard-00001/000000004" and back[4].image_ext == "png"
    (command,) = expand_shards(f"pipe:cat {shards[1]}")
    piped = list(iter_shard(command))
    assert [(r.key, r.caption, r.image_bytes) for r in piped] == [(r.key, r.caption, r.image_bytes)
                                                                   for r in back[3:6]]


def add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def test_caption_from_json_sidecar_and_missing_caption(tmp_path):
    path = tmp_path / "web.tar"
    with tarfile.open(path, "w") as archive:
        add_member(archive, "a.jpg", b"jpeg-a")
        add_member(archive, "a.json", json.dumps({"caption": "from json", "width": 5}).encode())
        add_member(archive, "b.webp", b"webp-b")
    a, b = iter_shard(str(path))
    assert (a.key, a.caption, a.image_ext, a.image_bytes, a.extra["width"]) == ("web/a", "from json", "jpg",
                                                                                 b"jpeg-a", 5)
    assert (b.caption, b.image_ext) == (None, "webp")


@pytest.mark.parametrize("cut", [4096, 4096 + 300])  # on and off a 512-byte block boundary
def test_truncated_shard_yields_what_it_can_then_names_itself(tmp_path, cut):
    records = make_image_records(tmp_path / "images", 6)
    (shard,) = write_shards(records, tmp_path / "shards")
    broken = tmp_path / "broken.tar"
    broken.write_bytes(shard.read_bytes()[:cut])
    readable = []
    with pytest.raises(DataError, match="broken.tar"):
        for record in iter_shard(str(broken)):
            readable.append(record.caption)
    # Each sample is 3 members of 1024 bytes; the one cut short is not yielded.
    assert readable == ["caption 0"]


def test_failing_pipe_command_is_an_error_naming_it(tmp_path):
    with pytest.raises(DataError, match="missing.tar"):
        list(iter_records(f"pipe:cat {tmp_path / 'missing.tar'}"))


def test_image_folder_with_sidecar_captions(tmp_path):
    make_image_records(tmp_path, 3)
    (tmp_path / "1.txt").write_text("one\n")
    back = list(iter_records(tmp_path))
    assert [(record.key, record.caption) for record in back] == [("0.png", None), ("1.png", "one"),
                                                                  ("2.png", None)]


def test_caption_file_gives_one_imageless_record_per_line(tmp_path):
    path = tmp_path / "captions.txt"
    lines = ["  a red square ", "", "a blue circle", "   ", "two dogs"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    back = list(iter_records(path))
    expected = [(f"{path}:{number}", line.strip()) for number, line in enumerate(lines, start=1) if line.strip()]
    assert [(record.key, record.caption) for record in back] == expected
    assert all(record.image_path is None and record.image_bytes is None for record in back)
    with pytest.raises(DataError, match="record .* has no image"):
        back[0].open_image_bytes()
    with pytest.raises(DataError, match="missing.txt"):
        list(iter_records(tmp_path / "missing.txt"))
