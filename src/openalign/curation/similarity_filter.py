"""The similarity filter: score every pair with a checkpoint, keep the best-scoring, drop near-duplicate images.

`run_similarity_filter(source, out_dir, model, config)` does it all in one process; under torchrun, call
`score_corpus` on every rank and then `filter_by_scores` on one (what `openalign filter --similarity` does).
`filter_by_scores` alone re-thresholds saved scores without a model. Outputs in `out_dir`:

    scoring.json, embeddings/, scores.parquet   the scores (openalign.curation.scores), unless --scores-from
    manifest.jsonl or shards/                    the kept pairs, each with its score as a `similarity` field
    dropped.jsonl                                every other pair: key, caption, score and why ("score",
                                                 "duplicate" with the key it duplicates, or "unreadable")
    report.json, report.txt, scores.png          counts, quantiles, per-label figures, histogram, and the
                                                 scorer check: does the model tell a pair from the same image
                                                 with a shuffled caption (openalign.curation.scorer_check)

Memory: scoring holds one part; selection about 34 bytes a scored pair (index, score, status, label, the
duplicate it points at), deduplication what openalign.curation.dedup says; the kept pairs are written as the
source streams past.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from openalign.curation import report as reports
from openalign.curation.dedup import METHODS, FolderRows, deduplicate
from openalign.curation.scorer_check import check_scorer
from openalign.curation.scores import (
    EMBEDDINGS_FOLDER,
    CurationError,
    check_scoring_model,
    iter_score_batches,
    read_scores,
    score_columns,
    score_corpus,
    scoring_summary,
)
from openalign.curation.selection import check_keep_fraction, priority_order, select_by_score
from openalign.data.filter_outputs import DROPPED, filter_outputs, resolve_output, write_kept, write_report
from openalign.errors import ConfigError
from openalign.files import atomic_open

REPORT_SKIPPED_LIMIT = 100  # unreadable pairs named in report.json; dropped.jsonl names all of them


@dataclass
class SimilarityConfig:
    """How pairs are kept: `keep_fraction` (top share by score, in (0, 1]) and / or `min_similarity` (a
    cosine in [-1, 1]); then `dedup_similarity` (an image cosine in (0, 1]) drops near-duplicates of kept
    pairs. `label_field`: the record field holding noise labels, for the report. Scoring: `part_size` pairs a
    part, `batch_size` pairs a forward (default: the encoders' tuned size), `num_workers` decoding threads.
    `output`: "auto" (like the source), "manifest" or "shards"."""

    keep_fraction: float | None = None
    min_similarity: float | None = None
    dedup_similarity: float | None = None
    dedup_method: str = "auto"
    dedup_clusters: int | None = None
    label_field: str = "noise"
    part_size: int = 10_000
    batch_size: int | None = None
    num_workers: int = 0
    output: str = "auto"

    def validate(self) -> SimilarityConfig:
        """Raise ConfigError naming the first value that cannot work; return self."""
        if self.keep_fraction is not None:
            check_keep_fraction(self.keep_fraction)
        if self.min_similarity is not None and not -1.0 <= self.min_similarity <= 1.0:
            raise ConfigError(f"min similarity {self.min_similarity!r} must lie in [-1, 1]: it is a cosine")
        if self.dedup_similarity is not None and not 0.0 < self.dedup_similarity <= 1.0:
            raise ConfigError(f"dedup similarity {self.dedup_similarity!r} must lie in (0, 1]: the image cosine "
                              "at which two pairs count as duplicates")
        if self.dedup_method not in METHODS:
            raise ConfigError(f"dedup method {self.dedup_method!r} is not one of {list(METHODS)}")
        if self.dedup_clusters is not None and self.dedup_clusters < 1:
            raise ConfigError(f"dedup clusters {self.dedup_clusters} must be at least 1")
        if self.part_size < 1 or (self.batch_size is not None and self.batch_size < 1) or self.num_workers < 0:
            raise ConfigError(f"part size {self.part_size} and batch size {self.batch_size} must be positive, "
                              f"workers {self.num_workers} not negative")
        return self


def load_scoring_encoders(model, device="auto", dtype: str = "float32", batch_size: int | None = None,
                          optimize: bool = True):
    """openalign.inference.encoders for a checkpoint that `check_scoring_model` accepts."""
    from openalign.inference.encoders import load_encoders

    return load_encoders(check_scoring_model(model), device=device, dtype=dtype, batch_size=batch_size,
                         optimize=optimize)


def run_similarity_filter(source, out_dir, model=None, config: SimilarityConfig | None = None, *, encoders=None,
                          progress: bool = False, **encoder_options) -> dict:
    """Score `source` with the checkpoint `model` (or ready `encoders`), then keep and write as
    `filter_by_scores` does; one process. A rerun into the same `out_dir` resumes or reuses the scores."""
    config = (config or SimilarityConfig()).validate()
    encoders = encoders or load_scoring_encoders(model, **encoder_options)
    score_corpus(source, out_dir, encoders, part_size=config.part_size, batch_size=config.batch_size,
                 num_workers=config.num_workers, progress=progress)
    return filter_by_scores(source, out_dir, config)


def filter_by_scores(source, out_dir, config: SimilarityConfig | None = None, scores_from=None) -> dict:
    """Keep the pairs of `source` that the scores in `scores_from` (default: `out_dir`) and `config` keep,
    write them and the report into `out_dir`, and return the report (module docstring)."""
    started = time.perf_counter()
    config = (config or SimilarityConfig()).validate()
    output = resolve_output(source, config.output)
    out = Path(out_dir)
    scoring_folder = Path(scores_from) if scores_from is not None else out
    summary = scoring_summary(scoring_folder)
    with_shuffled = "shuffled_score" in score_columns(scoring_folder)
    columns = read_scores(scoring_folder, ("index", "score", "shuffled_score") if with_shuffled else ("index", "score"))
    indices, scores, shuffled = columns["index"], columns["score"], columns.get("shuffled_score")
    if len(scores) == 0 and summary["skipped"] == 0:
        raise CurationError(f"{source} holds no pairs: nothing to score")
    if len(scores) == 0:
        raise CurationError(f"{source}: no pair could be scored ({summary['skipped']} unreadable or without a "
                            f"caption; see {scoring_folder / EMBEDDINGS_FOLDER / 'summary.json'})")
    with filter_outputs(out):  # locked, the previous report removed; this one is written last
        selection = select_by_score(scores, config.keep_fraction, config.min_similarity)
        status = np.where(selection.keep, reports.KEPT, reports.BELOW).astype(np.int8)
        duplicate_of = np.full(len(scores), -1, dtype=np.int64)
        duplicate_cosine = np.zeros(len(scores), dtype=np.float32)
        dedup = None
        if config.dedup_similarity is not None:
            order = priority_order(scores)
            candidates = order[selection.keep[order]]
            rows = FolderRows(scoring_folder / EMBEDDINGS_FOLDER, "image")
            if len(rows) != len(scores):
                raise CurationError(f"{scoring_folder}: {len(rows)} image embeddings for {len(scores)} scores")
            found = deduplicate(rows.view(candidates), config.dedup_similarity, method=config.dedup_method,
                                num_clusters=config.dedup_clusters)
            duplicates = ~found.kept
            status[candidates[duplicates]] = reports.DUPLICATE
            duplicate_of[candidates[duplicates]] = candidates[found.duplicate_of[duplicates]]
            duplicate_cosine[candidates[duplicates]] = found.cosine[duplicates]
            dedup = {"threshold": config.dedup_similarity, "method": found.method, "clusters": found.num_clusters,
                     "candidates": len(candidates), "dropped": int(duplicates.sum())}

        labels = np.full(len(scores), -1, dtype=np.int32)
        vocabulary: list[str] = []
        writer = _PairWriter(out, scoring_folder, indices, scores, status, duplicate_of, duplicate_cosine,
                             summary["skipped_pairs"], config.label_field, labels, vocabulary)
        with writer:
            outputs = write_kept(writer.kept_records(source), out, output)
        histogram = reports.plot_scores(out / "scores.png", scores, labels, vocabulary, selection.lowest_kept_score,
                                        shuffled=shuffled)
        report = {
            "source": str(source), "model": summary["model"],
            "scores_from": None if scores_from is None else str(scores_from),
            "scored": int(len(scores)), "unscored": summary["skipped"],
            "unscored_pairs": [{"key": entry["source"], "error": entry["error"]}
                               for entry in summary["skipped_pairs"][:REPORT_SKIPPED_LIMIT]],
            "kept": int((status == reports.KEPT).sum()), "dropped_by_score": int((status == reports.BELOW).sum()),
            "dropped_as_duplicate": int((status == reports.DUPLICATE).sum()),
            "selection": {"keep_fraction": config.keep_fraction, "min_similarity": config.min_similarity,
                          "rule": selection.rule, "kept_by_fraction": selection.kept_by_fraction,
                          "kept_by_threshold": selection.kept_by_threshold,
                          "lowest_kept_score": _rounded(selection.lowest_kept_score)},
            "dedup": dedup, "score_quantiles": reports.score_quantiles(scores),
            # A training run's own estimates (loss.pair_estimates) come without shuffled scores: no check.
            "scorer_check": None if shuffled is None else check_scorer(scores, shuffled),
            "labels": reports.label_figures(status, labels, vocabulary, scores) if vocabulary else None,
            "config": asdict(config),
            "outputs": {**outputs, "dropped": str(out / DROPPED), "scores": summary["scores"],
                        "histogram": str(histogram)},
            "seconds": round(time.perf_counter() - started, 3),
        }
        write_report(out, report, reports.format_similarity_report(report))
        return report


def _rounded(score: float | None) -> float | None:
    """A float32 score as JSON shows it: the six decimals dropped.jsonl gives, not float64's 17 digits."""
    return None if score is None else round(score, 6)


class _PairWriter:
    """The pass that writes the outputs: walks the source in step with the scores (both in source order),
    yields the kept records (with their score), writes dropped.jsonl, and records each scored pair's label.
    A source that no longer matches its scores (other keys, more or fewer pairs) is an error, not a guess."""

    def __init__(self, out: Path, scoring_folder: Path, indices, scores, status, duplicate_of, duplicate_cosine,
                 skipped_pairs, label_field, labels, vocabulary):
        self.out, self.scoring_folder = out, scoring_folder
        self.indices, self.scores, self.status = indices, scores, status
        self.duplicate_of, self.duplicate_cosine = duplicate_of, duplicate_cosine
        self.skipped = {entry["index"]: entry for entry in skipped_pairs}
        self.label_field, self.labels, self.vocabulary = label_field, labels, vocabulary
        self.representative_keys = _keys_at(scoring_folder, np.unique(duplicate_of[duplicate_of >= 0]))
        self.dropped_file = None

    def __enter__(self) -> _PairWriter:
        self._dropped = atomic_open(self.out / DROPPED, "w", encoding="utf-8")
        self.dropped_file = self._dropped.__enter__()
        return self

    def __exit__(self, *failure) -> None:
        self._dropped.__exit__(*failure)  # renamed into place, or removed when the pass failed

    def _drop(self, line: dict) -> None:
        self.dropped_file.write(json.dumps(line, ensure_ascii=False) + "\n")

    def _label_code(self, record) -> int:
        value = record.extra.get(self.label_field)
        if value is None:
            return -1
        if str(value) not in self.vocabulary:
            self.vocabulary.append(str(value))
        return self.vocabulary.index(str(value))

    def kept_records(self, source) -> Iterator:
        from openalign.data.sources import iter_records

        keys = _score_keys(self.scoring_folder)
        position, total = 0, len(self.indices)
        for number, record in enumerate(iter_records(source)):
            if position < total and self.indices[position] == number:
                scored_key = next(keys)
                if scored_key != record.key:
                    raise CurationError(f"{source}: pair {number} is {record.key!r}, the scores say {scored_key!r}: "
                                        "the source changed since it was scored; score it again")
                self.labels[position] = self._label_code(record)
                score, status = float(self.scores[position]), self.status[position]
                if status == reports.KEPT:
                    record.extra = {**record.extra, "similarity": round(score, 6)}
                    yield record
                elif status == reports.BELOW:
                    self._drop({"key": record.key, "caption": record.caption, "score": round(score, 6),
                                "reason": "score"})
                else:
                    representative = int(self.duplicate_of[position])
                    self._drop({"key": record.key, "caption": record.caption, "score": round(score, 6),
                                "reason": "duplicate", "duplicate_of": self.representative_keys[representative],
                                "image_cosine": round(float(self.duplicate_cosine[position]), 6)})
                position += 1
            elif number in self.skipped:
                self._drop({"key": record.key, "caption": record.caption, "reason": "unreadable",
                            "error": self.skipped[number]["error"]})
            else:
                raise CurationError(f"{source}: pair {number} ({record.key!r}) has neither a score nor a reason it "
                                    "was skipped: the source changed since it was scored; score it again")
        if position != total:
            raise CurationError(f"{source}: the source ended after {position} of its {total} scored pairs: it "
                                "changed since it was scored; score it again")


def _score_keys(folder: Path) -> Iterator[str]:
    """The key column of scores.parquet, streamed in source order."""
    for batch in iter_score_batches(folder, ["key"]):
        yield from batch.column(0).to_pylist()


def _keys_at(folder: Path, positions: np.ndarray) -> dict[int, str]:
    """{position: key} for a sorted set of positions of scores.parquet, streamed."""
    wanted, found, start = positions, {}, 0
    if len(wanted) == 0:
        return found
    for batch in iter_score_batches(folder, ["key"]):
        end = start + batch.num_rows
        inside = wanted[(wanted >= start) & (wanted < end)]
        keys = batch.column(0)
        found.update({int(position): keys[int(position) - start].as_py() for position in inside})
        start = end
    return found
