"""The ALIGN paper's data filters, applied to a manifest, WebDataset shards or an image folder.

Rules (each can be switched off; the paper's thresholds are the defaults):
    min_side            keep images whose shorter side is over `min_side` pixels
    aspect              keep images whose aspect ratio (long / short side) is under `max_aspect`
    captions_per_image  drop images (by content hash) paired with more than `max_captions_per_image` alt-texts
    images_per_caption  drop alt-texts (lower-cased, whitespace collapsed) shared by more than
                        `max_images_per_caption` pairs
    rare_token          drop alt-texts holding a token outside the corpus vocabulary (see `CorpusStatistics`)
    length              drop alt-texts with fewer than `min_words` or more than `max_words` unigrams
    near_duplicate      drop images within `max_hamming` bits (64-bit pHash) of an evaluation image
and, always on, `unreadable`: images whose header cannot be read.

Two passes over the source, both streaming. The first reads each image's header (not its pixels; the pixels
only when near-duplicates are sought), hashes its bytes, and counts tokens, captions and images (see
openalign.data.counting for how in bounded memory); per-record image facts go to a temporary file so that the
second pass, which applies the rules and writes the kept pairs, reads no image header twice. Image work runs
in a process pool over batches, so memory stays bounded by the batch size.

A pair dropped by several rules is counted under each rule, and once in the total.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from openalign.data import counting, phash, sources
from openalign.data.filter_outputs import DROPPED, filter_outputs, resolve_output, write_kept, write_report
from openalign.data.sources import DataError, Record
from openalign.errors import ConfigError
from openalign.files import atomic_open

RULES = ("min_side", "aspect", "captions_per_image", "images_per_caption", "rare_token", "length",
         "near_duplicate")


@dataclass
class FilterConfig:
    """Thresholds of the paper's rules (its values are the defaults) and how to run them."""

    min_side: int = 200
    max_aspect: float = 3.0
    max_captions_per_image: int = 1000
    max_images_per_caption: int = 10
    # The vocabulary: the top_unigrams unigrams and top_bigrams bigrams by count, each seen at least
    # min_token_count times (without a floor, a corpus smaller than top_unigrams would call nothing rare).
    top_unigrams: int = 100_000
    top_bigrams: int = 100_000
    min_token_count: int = 5
    min_words: int = 3
    max_words: int = 20
    eval_images: str | None = None  # a folder, manifest or shard spec; enables near_duplicate
    max_hamming: int = 10
    disabled: tuple[str, ...] = ()
    counter_capacity: int | None = None  # token counters keep 2x this many entries; default 4 x top-K
    hash_memory_items: int = 50_000_000  # caption / image hashes held in memory before spilling to disk
    workers: int | None = None  # processes reading image headers; default: all cores
    batch_size: int = 1024

    def validate(self) -> None:
        """Raise ConfigError naming the first field that cannot work."""
        for name in self.disabled:
            if name not in RULES:
                raise ConfigError(f"FilterConfig.disabled: unknown rule {name!r}; rules are {list(RULES)}")
        for name in ("min_side", "max_captions_per_image", "max_images_per_caption", "top_unigrams",
                     "top_bigrams", "min_token_count", "min_words", "max_words", "max_hamming"):
            if getattr(self, name) < 0:
                raise ConfigError(f"FilterConfig.{name} must not be negative, got {getattr(self, name)}")
        if self.max_aspect < 1:
            raise ConfigError(f"FilterConfig.max_aspect must be at least 1, got {self.max_aspect}")
        if self.min_words > self.max_words:
            raise ConfigError(f"FilterConfig.min_words={self.min_words} exceeds max_words={self.max_words}")

    def enabled(self, rule: str) -> bool:
        """Whether a rule applies; near_duplicate needs `eval_images` as well."""
        if rule == "near_duplicate" and not self.eval_images:
            return False
        return rule not in self.disabled


def normalize_caption(caption: str | None) -> str:
    """The form under which alt-texts count as shared: lower case, single spaces."""
    return " ".join(caption.lower().split()) if caption else ""


# ---------------------------------------------------------------- pass 1: counting


@dataclass
class CorpusStatistics:
    """What the first pass learned: the vocabulary, the over-shared captions and images, and per-record
    image facts (in a temporary file, read back by index in the second pass)."""

    unigrams: set[str]
    bigrams: set[str]
    caption_counts: counting.HashCounter
    image_counts: counting.HashCounter
    probe_path: Path
    errors: dict[int, str]
    total: int
    token_error_bound: int
    eval_hashes: np.ndarray
    temporary: tempfile.TemporaryDirectory | None = None

    def probes(self) -> np.ndarray:
        """Per-record image facts, memory-mapped (phash.PROBE_DTYPE)."""
        if self.total == 0:
            return np.zeros(0, dtype=phash.PROBE_DTYPE)
        return np.memmap(self.probe_path, dtype=phash.PROBE_DTYPE, mode="r", shape=(self.total,))

    def close(self) -> None:
        """Remove the temporary per-record file."""
        if self.temporary is not None:
            self.temporary.cleanup()
            self.temporary = None


def count_corpus(records: Iterable[Record], config: FilterConfig, progress: Callable[[int], None] | None = None,
                 ) -> CorpusStatistics:
    """The first pass: stream the records once, reading image headers in a process pool, and gather what
    the rules need."""
    config.validate()
    capacity = config.counter_capacity or 4 * max(config.top_unigrams, config.top_bigrams, 1)
    unigram_counter = counting.FrequentItemsCounter(capacity)
    bigram_counter = counting.FrequentItemsCounter(capacity)
    caption_counts = counting.HashCounter(config.hash_memory_items)
    image_counts = counting.HashCounter(config.hash_memory_items)
    eval_hashes = (phash.eval_image_hashes(config.eval_images, config.workers)
                   if config.enabled("near_duplicate") else np.zeros(0, dtype=np.uint64))
    temporary = tempfile.TemporaryDirectory(prefix="openalign-filter-")
    probe_path = Path(temporary.name) / "probes.bin"
    errors: dict[int, str] = {}
    total = 0
    prober = phash.ImageProber(config.workers)
    try:
        with open(probe_path, "wb") as probe_file:
            for batch in phash.batches(records, config.batch_size):
                results = prober.probe(batch, config.enabled("near_duplicate"))
                facts = np.array([facts for facts, _ in results], dtype=phash.PROBE_DTYPE)
                facts.tofile(probe_file)
                for offset, (record, (_, error)) in enumerate(zip(batch, results)):
                    tokens = counting.tokenize(record.caption)
                    unigram_counter.update(tokens)
                    bigram_counter.update(counting.bigrams(tokens))
                    caption_counts.add(counting.stable_hash(normalize_caption(record.caption)))
                    if error:
                        errors[total + offset] = error
                    else:
                        image_counts.add(int(facts[offset]["image_hash"]))
                total += len(batch)
                if progress:
                    progress(len(batch))
    except BaseException:
        temporary.cleanup()
        raise
    finally:
        prober.close()
    caption_counts.finish(config.max_images_per_caption)
    image_counts.finish(config.max_captions_per_image)
    unigrams = {token for token, _ in unigram_counter.most_common(config.top_unigrams, config.min_token_count)}
    bigrams = {pair for pair, _ in bigram_counter.most_common(config.top_bigrams, config.min_token_count)}
    return CorpusStatistics(
        unigrams=unigrams, bigrams=bigrams, caption_counts=caption_counts, image_counts=image_counts,
        probe_path=probe_path, errors=errors, total=total, eval_hashes=eval_hashes, temporary=temporary,
        token_error_bound=max(unigram_counter.error_bound, bigram_counter.error_bound),
    )


# ---------------------------------------------------------------- pass 2: the rules


def rare_tokens(tokens: list[str], unigrams: set[str], bigrams: set[str]) -> list[str]:
    """The tokens of a caption outside the vocabulary. A token is in it when it is a frequent unigram, or
    when it forms a frequent bigram with its left or right neighbour ("new york" may be frequent where
    "york" alone is not)."""
    rare = []
    for position, token in enumerate(tokens):
        if token in unigrams:
            continue
        left = position > 0 and f"{tokens[position - 1]} {token}" in bigrams
        right = position + 1 < len(tokens) and f"{token} {tokens[position + 1]}" in bigrams
        if not (left or right):
            rare.append(token)
    return rare


def record_reasons(record: Record, facts, near_duplicate: bool, stats: CorpusStatistics,
                   config: FilterConfig) -> list[str]:
    """The names of the rules that drop this record (empty: kept)."""
    reasons = []
    if not facts["readable"]:
        reasons.append("unreadable")
    else:
        short_side = min(int(facts["width"]), int(facts["height"]))
        long_side = max(int(facts["width"]), int(facts["height"]))
        if config.enabled("min_side") and not short_side > config.min_side:
            reasons.append("min_side")
        if config.enabled("aspect") and not (short_side > 0 and long_side / short_side < config.max_aspect):
            reasons.append("aspect")
        if config.enabled("captions_per_image") and stats.image_counts.count_if_heavy(int(facts["image_hash"])):
            reasons.append("captions_per_image")
        if config.enabled("near_duplicate") and near_duplicate:
            reasons.append("near_duplicate")
    tokens = counting.tokenize(record.caption)
    if config.enabled("images_per_caption") and stats.caption_counts.count_if_heavy(
            counting.stable_hash(normalize_caption(record.caption))):
        reasons.append("images_per_caption")
    if config.enabled("rare_token") and rare_tokens(tokens, stats.unigrams, stats.bigrams):
        reasons.append("rare_token")
    if config.enabled("length") and not config.min_words <= len(tokens) <= config.max_words:
        reasons.append("length")
    return reasons


def filter_records(records: Iterable[Record], stats: CorpusStatistics, config: FilterConfig,
                   ) -> Iterator[tuple[Record, list[str]]]:
    """The second pass: yield each record with the rules that drop it. `records` must be the stream
    `count_corpus` saw, in the same order."""
    probes = stats.probes()
    index = 0
    for batch in phash.batches(records, config.batch_size):
        if index + len(batch) > stats.total:
            raise DataError(f"the source yielded more than the {stats.total} records of the first pass; "
                            "did it change between the passes?")
        facts = probes[index:index + len(batch)]
        near = np.zeros(len(batch), dtype=bool)
        if config.enabled("near_duplicate"):
            near = phash.min_hamming_distances(facts["phash"], stats.eval_hashes) <= config.max_hamming
        for offset, record in enumerate(batch):
            yield record, record_reasons(record, facts[offset], bool(near[offset]), stats, config)
        index += len(batch)
    if index != stats.total:
        raise DataError(f"the source yielded {index} records, the first pass {stats.total}; did it change "
                        "between the passes?")


# ---------------------------------------------------------------- the whole run


def run_filter(source, out_dir: str | os.PathLike, config: FilterConfig | None = None, output: str = "auto",
               progress: bool = False) -> dict:
    """Filter `source` (manifest, shard spec or image folder) into `out_dir`: the kept pairs (a manifest,
    `manifest.jsonl`, or WebDataset shards under `shards/`; "auto" follows the source), `dropped.jsonl`
    (key, caption and rules of each dropped pair), `report.json` and `report.txt`, committed as
    openalign.data.filter_outputs says (one filter at a time, the report last). Returns the report."""
    config = config or FilterConfig()
    config.validate()
    output = resolve_output(source, output)
    sources.check_source(source)
    with filter_outputs(out_dir) as out:
        return _filter_into(source, out, config, output, progress)


def _filter_into(source, out: Path, config: FilterConfig, output: str, progress: bool) -> dict:
    started = time.perf_counter()
    bar = _bar(progress, "filter: counting")
    stats = count_corpus(sources.iter_records(source), config, progress=bar.update if bar is not None else None)
    if bar is not None:
        bar.close()
    dropped_by_rule = dict.fromkeys([*(rule for rule in RULES if config.enabled(rule)), "unreadable"], 0)
    only_rule = dict.fromkeys(dropped_by_rule, 0)
    kept = 0
    bar = _bar(progress, "filter: applying", total=stats.total)
    try:
        with atomic_open(out / DROPPED, "w", encoding="utf-8") as dropped_file:

            def kept_records() -> Iterator[Record]:
                nonlocal kept
                pairs = filter_records(sources.iter_records(source), stats, config)
                for index, (record, reasons) in enumerate(pairs):
                    if bar is not None:
                        bar.update(1)
                    if not reasons:
                        kept += 1
                        yield record
                        continue
                    for rule in reasons:
                        dropped_by_rule[rule] += 1
                    if len(reasons) == 1:
                        only_rule[reasons[0]] += 1
                    line = {"key": record.key, "caption": record.caption, "rules": reasons}
                    if "unreadable" in reasons:
                        line["error"] = stats.errors.get(index, "")
                    dropped_file.write(json.dumps(line, ensure_ascii=False) + "\n")

            outputs = write_kept(kept_records(), out, output)
    finally:
        if bar is not None:
            bar.close()
        stats.close()

    report = {
        "source": str(source), "total": stats.total, "kept": kept, "dropped": stats.total - kept,
        "dropped_by_rule": dropped_by_rule, "dropped_only_by_rule": only_rule,
        "rules": {rule: config.enabled(rule) for rule in RULES}, "thresholds": thresholds(config),
        "config": dataclasses.asdict(config),
        "vocabulary": {"unigrams": len(stats.unigrams), "bigrams": len(stats.bigrams),
                       "token_count_error_bound": stats.token_error_bound},
        "outputs": {**outputs, "dropped": str(out / DROPPED)},
        "seconds": round(time.perf_counter() - started, 3),
    }
    write_report(out, report, format_report(report))
    return report


def thresholds(config: FilterConfig) -> dict[str, str]:
    """Each rule's condition for keeping a pair, in words."""
    return {
        "min_side": f"shorter side > {config.min_side} px",
        "aspect": f"long / short side < {config.max_aspect:g}",
        "captions_per_image": f"image has <= {config.max_captions_per_image} alt-texts",
        "images_per_caption": f"alt-text shared by <= {config.max_images_per_caption} pairs",
        "rare_token": f"all tokens in top {config.top_unigrams} unigrams / {config.top_bigrams} bigrams "
                      f"(count >= {config.min_token_count})",
        "length": f"{config.min_words} <= unigrams <= {config.max_words}",
        "near_duplicate": f"pHash > {config.max_hamming} bits from every evaluation image",
        "unreadable": "image header readable",
    }


def format_report(report: dict) -> str:
    """The report as a table: pairs dropped per rule (a pair can count under several; "only" counts the
    pairs no other rule dropped), then the totals."""
    total = max(report["total"], 1)
    width = max(len(text) for text in report["thresholds"].values())
    lines = [f"{'rule':<20} {'keeps a pair when':<{width}} {'dropped':>9} {'only':>9} {'share':>7}"]
    for rule, count in report["dropped_by_rule"].items():
        lines.append(f"{rule:<20} {report['thresholds'][rule]:<{width}} {count:>9} "
                     f"{report['dropped_only_by_rule'][rule]:>9} {100 * count / total:>6.1f}%")
    label = 21 + width
    for name, count in (("dropped (any rule)", report["dropped"]), ("kept", report["kept"]),
                        ("total", report["total"])):
        lines.append(f"{name:<{label}} {count:>9} {'':>9} {100 * count / total:>6.1f}%")
    return "\n".join(lines) + "\n"


def _bar(enabled: bool, description: str, total: int | None = None):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="pair")
