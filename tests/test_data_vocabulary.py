"""The captions of any source: a WordPiece vocabulary learnt from a manifest's caption column (never its keys or
file names), and the record counts a progress bar is given."""

from __future__ import annotations

import pytest

from openalign.data.sources import DataError, count_records, iter_records, write_manifest, write_shards
from openalign.data.vocabulary import source_captions, train_tokenizer
from tests.test_data_sources import make_image_records

CAPTIONS = ["a red circle on grass", "two blue squares", "a green star at the top", "three yellow hexagons",
            "a purple cross", "a small orange triangle"] * 5


@pytest.fixture
def records(tmp_path):
    made = make_image_records(tmp_path / "images", len(CAPTIONS))
    for record, caption in zip(made, CAPTIONS):
        record.caption = caption
        record.extra = {"colour_column": "magenta", "split": "train"}  # words no caption holds
    return made


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_a_manifest_teaches_the_vocabulary_of_its_captions_alone(tmp_path, records, suffix):
    """Room for every merge: each caption word becomes a token, and every token is a piece of a caption (the
    oracle: the caption strings), none of the other columns' values, the keys or the file names."""
    manifest = write_manifest(records, tmp_path / f"manifest{suffix}")
    tokenizer = train_tokenizer(manifest, 500, tmp_path / "from-manifest", min_frequency=1)
    vocabulary = set(tokenizer.tokenizer.get_vocab()) - {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}
    text = " ".join(CAPTIONS)
    assert {word for caption in CAPTIONS for word in caption.split()} <= vocabulary
    assert all(token.removeprefix("##") in text for token in vocabulary)
    assert not {"magenta", "image_path", "split", "png"} & vocabulary
    assert (tmp_path / "from-manifest" / "vocab.txt").is_file()


def test_shards_folders_and_caption_files_give_their_captions(tmp_path, records):
    write_shards(records, tmp_path / "shards", samples_per_shard=7)
    (tmp_path / "captions.txt").write_text("\n".join(CAPTIONS[:4]) + "\n\n")
    assert list(source_captions(str(tmp_path / "shards"))) == CAPTIONS
    assert list(source_captions([str(tmp_path / "captions.txt")])) == CAPTIONS[:4]


def test_a_source_without_captions_is_refused_by_name(tmp_path, records):
    folder = tmp_path / "images"  # images without sidecar captions
    with pytest.raises(DataError, match=f"{folder}: no captions to learn a vocabulary from"):
        train_tokenizer(folder, 60)


def test_counts_match_what_iter_records_yields(tmp_path, records):
    write_shards(records, tmp_path / "shards", samples_per_shard=7)
    manifest = write_manifest(records, tmp_path / "manifest.jsonl")
    (tmp_path / "captions.txt").write_text("one\n\ntwo\nthree\n")
    sources = [str(manifest), str(tmp_path / "shards"), str(tmp_path / "images"), str(tmp_path / "captions.txt"),
               [str(manifest), str(tmp_path / "captions.txt")]]
    for source in sources:
        assert count_records(source) == len(list(iter_records(source))), source
    assert count_records(f"pipe:cat {tmp_path / 'shards'}/shard-00000.tar") is None  # a stream is read once


def test_tokenizer_train_prints_its_lines_and_no_blank_ones(tmp_path, records, capfd):
    """Off a terminal, tokenizers' progress bars (written to the stdout file, below Python) leave blank lines."""
    from openalign.cli import main

    manifest = write_manifest(records, tmp_path / "manifest.jsonl")
    assert main(["tokenizer", "train", str(manifest), "--vocab-size", "60", "--out", str(tmp_path / "tok")]) == 0
    printed = capfd.readouterr().out
    assert printed.startswith("wrote a ") and "" not in printed.splitlines(), repr(printed)
