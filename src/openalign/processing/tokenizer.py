"""BERT WordPiece text tokenizer on the Rust `tokenizers` library, and WordPiece vocabulary training.

A folder is read from `tokenizer.json` when present, else built from `vocab.txt`; in both cases the
lower-casing, accent stripping and Chinese-character settings of `tokenizer_config.json` win. Unlike
transformers, truncation to `max_length` is on by default, so one long caption cannot break a batch.
"""

from __future__ import annotations

import json
import logging
import pathlib
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers.models import WordPiece

from openalign.errors import ConfigError, TextInputError
from openalign.untrusted import read_json_object

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}
PADDING_CHOICES = ("max_length", "longest", "do_not_pad")
# A truncated text is first tokenized from a prefix of this many characters per kept token (doubled until the
# prefix provably holds the kept tokens): plenty for prose, whose tokens average under 5 characters.
PREFIX_CHARACTERS_PER_TOKEN = 16
# `decode` clean-up, the spaces BERT's tokenizer puts before punctuation and inside contractions.
_CLEANUP_REPLACEMENTS = (
    (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
    (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
)  # fmt: skip


class AlignTokenizer:
    """BERT WordPiece: text -> `input_ids`, `token_type_ids`, `attention_mask` (int64 tensors)."""

    def __init__(self, tokenizer: Tokenizer, config: dict | None = None, *, max_length: int = 64) -> None:
        self.config = dict(config or {})
        for key, token in SPECIAL_TOKENS.items():
            self.config.setdefault(key, token)
        self.tokenizer = tokenizer
        # Settings stored inside tokenizer.json would silently apply to every call; we set them per call.
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.max_length = max_length
        self.pad_token_id = self._token_id("pad_token")
        self._token_id("unk_token")

    @classmethod
    def from_pretrained(cls, folder: str | pathlib.Path, *, max_length: int | None = None) -> AlignTokenizer:
        """Load a folder holding `tokenizer.json` and/or `vocab.txt` (+ optional `tokenizer_config.json`).

        max_length: where texts are cut; by default 64 (ALIGN's), or the folder's `model_max_length` when that
        is shorter (a model trained on shorter texts, whose later positions never trained, saves it so)."""
        folder = pathlib.Path(folder)
        config_path = folder / "tokenizer_config.json"
        config = read_json_object(config_path) if config_path.is_file() else {}
        special_tokens_path = folder / "special_tokens_map.json"
        if special_tokens_path.is_file():
            for key, value in read_json_object(special_tokens_path).items():
                config.setdefault(key, value["content"] if isinstance(value, dict) else value)
        if (folder / "tokenizer.json").is_file():
            tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
            if isinstance(tokenizer.normalizer, normalizers.BertNormalizer) and any(
                key in config for key in ("do_lower_case", "strip_accents", "tokenize_chinese_chars")
            ):
                tokenizer.normalizer = _bert_normalizer(config)
        elif (folder / "vocab.txt").is_file():
            tokenizer = build_wordpiece_tokenizer(read_vocabulary(folder / "vocab.txt"), config)
        else:
            raise ConfigError(f"{folder}: no tokenizer.json or vocab.txt found")
        if max_length is None:
            saved = config.get("model_max_length")
            max_length = min(64, saved) if isinstance(saved, int) and saved >= 2 else 64
        return cls(tokenizer, config, max_length=max_length)

    @property
    def vocab_size(self) -> int:
        """Number of tokens in the vocabulary, special tokens included."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def __call__(
        self,
        text: str | Sequence[str],
        *,
        padding: bool | str = "max_length",
        max_length: int | None = None,
        truncation: bool = True,
        return_tensors: str | None = "pt",
    ) -> dict[str, Any]:
        """Tokenize one text or a batch.

        `padding`: "max_length" (pad to `max_length`, transformers' ALIGN default), "longest" / True (pad
        to the longest in the batch), "do_not_pad" / False. `max_length` defaults to 64. With
        `return_tensors="pt"` values are int64 tensors (B, T); with None, lists of lists.
        """
        texts = validate_texts(text)
        max_length = self.max_length if max_length is None else int(max_length)
        if max_length < 2:
            raise ConfigError(f"max_length must be at least 2 to hold [CLS] and [SEP], got {max_length}")
        padding = _padding_strategy(padding)
        # Truncating here rather than through `enable_truncation` keeps the shared Rust tokenizer stateless,
        # so threads can call it concurrently. Keeping the first tokens and the final [SEP] is what
        # tokenizers' own truncation does with the [CLS] $A [SEP] template.
        rows = []
        encodings = self._encode_prefixes(texts, max_length) if truncation else self._encode(texts)
        for encoding in encodings:
            ids, type_ids = list(encoding.ids), list(encoding.type_ids)
            if truncation and len(ids) > max_length:
                ids = ids[: max_length - 1] + ids[-1:]
                type_ids = type_ids[: max_length - 1] + type_ids[-1:]
            rows.append((ids, type_ids))
        longest = max(len(ids) for ids, _ in rows)
        target = {"max_length": max(max_length, longest), "longest": longest, "do_not_pad": None}[padding]
        batch = {"input_ids": [], "token_type_ids": [], "attention_mask": []}
        for ids, type_ids in rows:
            missing = 0 if target is None else target - len(ids)
            batch["input_ids"].append(ids + [self.pad_token_id] * missing)
            batch["token_type_ids"].append(type_ids + [0] * missing)
            batch["attention_mask"].append([1] * len(ids) + [0] * missing)
        if return_tensors == "pt":
            lengths = {len(ids) for ids in batch["input_ids"]}
            if len(lengths) > 1:
                raise ConfigError(
                    f"texts have different token counts {sorted(lengths)}; "
                    "use padding='longest' or 'max_length'"
                )
            return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}
        if return_tensors is not None:
            raise ConfigError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
        return batch

    def _encode(self, texts: list[str]) -> list:
        return self.tokenizer.encode_batch(texts, add_special_tokens=True)

    def _encode_prefixes(self, texts: list[str], max_length: int) -> list:
        """Encodings whose first `max_length - 1` tokens equal those of the whole texts, from prefixes of the texts
        where that is enough: the work is bounded by `max_length`, not by the length of a 10 MB caption.

        A prefix cut at any character tokenizes like the whole text except for its last word (pre-tokenization
        splits at whitespace and punctuation, and normalisation is per character), so its encoding is exact once
        the complete words before that last one fill `max_length - 2` tokens; otherwise the prefix doubles.
        """
        budget = max(PREFIX_CHARACTERS_PER_TOKEN * max_length, 256)
        encodings = self._encode([text[:budget] for text in texts])
        pending = [index for index, text in enumerate(texts)
                   if len(text) > budget and not _prefix_is_enough(encodings[index], max_length)]
        while pending:
            budget *= 2
            for index, encoding in zip(pending, self._encode([texts[index][:budget] for index in pending])):
                encodings[index] = encoding
            pending = [index for index in pending
                       if len(texts[index]) > budget and not _prefix_is_enough(encodings[index], max_length)]
        return encodings

    def encode(self, text: str) -> list[int]:
        """Token ids of one text with [CLS] and [SEP], unpadded and truncated to `max_length`."""
        return self(text, padding="do_not_pad", return_tensors=None)["input_ids"][0]

    def decode(self, token_ids: Sequence[int] | torch.Tensor, *, skip_special_tokens: bool = True) -> str:
        """Token ids back to text; punctuation spacing is cleaned up only if the config's
        `clean_up_tokenization_spaces` says so (off by default, as in transformers 5)."""
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.tolist()
        text = self.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)
        if self.config.get("clean_up_tokenization_spaces", False):
            for spaced, joined in _CLEANUP_REPLACEMENTS:
                text = text.replace(spaced, joined)
        return text

    def batch_decode(
        self, sequences: Sequence[Sequence[int]] | torch.Tensor, *, skip_special_tokens: bool = True
    ) -> list[str]:
        """`decode` for each row of a batch."""
        if isinstance(sequences, torch.Tensor):
            sequences = sequences.tolist()
        return [self.decode(ids, skip_special_tokens=skip_special_tokens) for ids in sequences]

    def save(self, folder: str | pathlib.Path) -> None:
        """Write tokenizer.json, vocab.txt, tokenizer_config.json and special_tokens_map.json."""
        folder = pathlib.Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(folder / "tokenizer.json"))
        vocabulary = self.tokenizer.get_vocab(with_added_tokens=True)
        ordered = sorted(vocabulary.items(), key=lambda item: item[1])
        if [index for _, index in ordered] != list(range(len(ordered))):
            raise ConfigError("vocabulary ids are not contiguous from 0; cannot write vocab.txt")
        (folder / "vocab.txt").write_text("".join(f"{token}\n" for token, _ in ordered), encoding="utf-8")
        normalizer_settings = _normalizer_settings(self.tokenizer)
        config = {
            "tokenizer_class": "BertTokenizer",
            **normalizer_settings,
            **{key: self.config[key] for key in SPECIAL_TOKENS},
            "model_max_length": int(self.config.get("model_max_length", 512)),
            "clean_up_tokenization_spaces": bool(self.config.get("clean_up_tokenization_spaces", False)),
        }
        _write_json(folder / "tokenizer_config.json", config)
        _write_json(folder / "special_tokens_map.json", {key: self.config[key] for key in SPECIAL_TOKENS})

    def _token_id(self, key: str) -> int:
        token = self.config[key]
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ConfigError(f"special token {key}={token!r} is not in the vocabulary")
        return token_id


def _prefix_is_enough(encoding, max_length: int) -> bool:
    """Whether the complete words of a prefix's encoding (all but its last, perhaps cut, word) give the
    `max_length - 2` tokens between [CLS] and [SEP] that truncation keeps."""
    words = [word for word in encoding.word_ids if word is not None]
    if not words:
        return False
    return sum(word < words[-1] for word in words) >= max_length - 2


def is_unicode_text(text: Any) -> bool:
    """Whether text is a string of valid Unicode (a JSON escape can produce a lone surrogate, which is not, and
    which no tokenizer takes)."""
    if not isinstance(text, str):
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def validate_texts(text: Any) -> list[str]:
    """One string or a non-empty list/tuple of strings, as a list; anything else, or a string that is not valid
    Unicode (a lone surrogate, as a JSON escape can make), is a TextInputError (a ValueError) naming the item."""
    if isinstance(text, str):
        text = [text]
    elif not isinstance(text, (list, tuple)):
        raise TextInputError(f"text must be a string or a list of strings, got {type(text).__name__}")
    if not text:
        raise TextInputError("the text batch is empty")
    for index, item in enumerate(text):
        if not isinstance(item, str):
            raise TextInputError(f"text item {index} is {type(item).__name__} ({item!r:.50}), not a string")
        if not is_unicode_text(item):
            raise TextInputError(f"text item {index} ({item[:40]!r}...) holds a lone surrogate, which is not text")
    return list(text)


def read_vocabulary(path: str | pathlib.Path) -> dict[str, int]:
    """vocab.txt (one token a line, id = line number) as a dict."""
    lines = pathlib.Path(path).read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return {token: index for index, token in enumerate(lines)}


def build_wordpiece_tokenizer(vocabulary: dict[str, int], config: dict | None = None) -> Tokenizer:
    """A BERT WordPiece `tokenizers.Tokenizer` from a vocabulary and tokenizer_config.json settings."""
    config = {**SPECIAL_TOKENS, **(config or {})}
    tokenizer = Tokenizer(WordPiece(vocabulary, unk_token=config["unk_token"], max_input_chars_per_word=100))
    tokenizer.normalizer = _bert_normalizer(config)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    tokenizer.add_special_tokens([config[key] for key in SPECIAL_TOKENS if config[key] in vocabulary])
    _add_post_processor(tokenizer, config)
    return tokenizer


def train_wordpiece(
    files_or_texts: str | pathlib.Path | Iterable[str],
    vocab_size: int,
    out_dir: str | pathlib.Path | None = None,
    *,
    min_frequency: int = 2,
    lowercase: bool = True,
    show_progress: bool = False,
    cap: bool = False,
) -> AlignTokenizer:
    """Train a BERT WordPiece vocabulary, as the ALIGN paper does on its own captions.

    `files_or_texts`: one caption file (str or Path; one caption a line), a list of `pathlib.Path` files,
    or any iterable of caption strings. A vocabulary smaller than `vocab_size` (a small or repetitive corpus)
    is logged as a warning, unless `cap` says that `vocab_size` is only an upper bound.
    When `out_dir` is given, the result is saved there in a layout both openalign and transformers load.
    """
    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise ConfigError(f"vocab_size must exceed the {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}")
    config = {
        **SPECIAL_TOKENS, "do_lower_case": lowercase, "strip_accents": None, "tokenize_chinese_chars": True
    }
    tokenizer = Tokenizer(WordPiece(unk_token=config["unk_token"], max_input_chars_per_word=100))
    tokenizer.normalizer = _bert_normalizer(config)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS.values()),
        continuing_subword_prefix="##",
        show_progress=show_progress,
    )
    files = caption_files(files_or_texts)
    if files is not None:
        tokenizer.train([str(path) for path in files], trainer)
    else:
        tokenizer.train_from_iterator(files_or_texts, trainer)
    learned = tokenizer.get_vocab_size() - len(SPECIAL_TOKENS)
    source = ", ".join(str(path) for path in files) if files is not None else "the captions given"
    if learned <= 0:
        raise TextInputError(f"no token learned from {source}: it holds no caption text")
    if learned + len(SPECIAL_TOKENS) < vocab_size and not cap:
        logger.warning("learned %d tokens from %s, fewer than the %d asked for: a small or repetitive corpus",
                       learned + len(SPECIAL_TOKENS), source, vocab_size)
    _add_post_processor(tokenizer, config)
    result = AlignTokenizer(tokenizer, config)
    if out_dir is not None:
        result.save(out_dir)
    return result


def caption_files(files_or_texts: Any) -> list[pathlib.Path] | None:
    """The caption files named by `train_wordpiece`'s first argument, or None when it holds captions.

    A lone str is a path; inside a list, only `pathlib.Path` items are, so a list of captions is never mistaken
    for file names. Missing files raise FileNotFoundError naming the first.
    """
    if isinstance(files_or_texts, (str, pathlib.Path)):
        files = [pathlib.Path(files_or_texts)]
    elif isinstance(files_or_texts, (list, tuple)) and files_or_texts and all(
        isinstance(item, pathlib.Path) for item in files_or_texts
    ):
        files = list(files_or_texts)
    else:
        return None
    missing = [path for path in files if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"caption file not found: {missing[0]}")
    return files


def _bert_normalizer(config: dict) -> normalizers.BertNormalizer:
    return normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=bool(config.get("tokenize_chinese_chars", True)),
        strip_accents=config.get("strip_accents"),
        lowercase=bool(config.get("do_lower_case", True)),
    )


def _add_post_processor(tokenizer: Tokenizer, config: dict) -> None:
    cls_token, sep_token = config["cls_token"], config["sep_token"]
    cls_id, sep_id = tokenizer.token_to_id(cls_token), tokenizer.token_to_id(sep_token)
    if cls_id is None or sep_id is None:
        raise ConfigError(f"{cls_token} or {sep_token} is missing from the vocabulary")
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{cls_token}:0 $A:0 {sep_token}:0",
        pair=f"{cls_token}:0 $A:0 {sep_token}:0 $B:1 {sep_token}:1",
        special_tokens=[(cls_token, cls_id), (sep_token, sep_id)],
    )


def _normalizer_settings(tokenizer: Tokenizer) -> dict:
    state = json.loads(tokenizer.to_str()).get("normalizer") or {}
    if state.get("type") != "BertNormalizer":
        return {}
    return {
        "do_lower_case": bool(state.get("lowercase", True)),
        "strip_accents": state.get("strip_accents"),
        "tokenize_chinese_chars": bool(state.get("handle_chinese_chars", True)),
    }


def _padding_strategy(padding: bool | str) -> str:
    if padding is True:
        return "longest"
    if padding is False:
        return "do_not_pad"
    if padding not in PADDING_CHOICES:
        raise ConfigError(f"padding must be one of {PADDING_CHOICES} or a bool, got {padding!r}")
    return padding



def _write_json(path: pathlib.Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")
