"""Similarity scores: the cosine of each pair's image and text embeddings under one checkpoint.

Layout of a scoring folder:

    scoring.json       the model it was scored with and the part size (a rerun must use the same)
    embeddings/        an embedding folder of kind "both" (openalign.inference.embed): image and text parts
    scores.parquet     one row per scored pair, in source order: index, key, caption, score (float32), and
                       shuffled_score: the same image's cosine with another pair's caption of its part
                       (openalign.curation.scorer_check: the yardstick of a scorer that has learnt nothing)

`score_corpus` streams a manifest or WebDataset shards through `embed_to_folder`, so scoring has embed's
guarantees: memory bounded by one part, parts written atomically, a rerun after a kill skips the finished parts
and gives the same bytes, ranks under torchrun write disjoint parts and the result does not depend on their
number, and an unreadable image (or a pair without a caption) is skipped and listed with the reason. The
scores come from the finished parts alone: each is the dot product of the stored float16 embeddings (L2
normalised), summed in float32, so `scores.parquet` is a function of the parts and as reproducible as they are.
`index` is the pair's position in the source stream and `key` the source's own key (the manifest's image path
as written, or "<shard>/<sample>"), so a user can join scores to the corpus and re-threshold without scoring
again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from openalign.curation.scorer_check import shuffled_partners
from openalign.data.score_files import SCORES_FILE, SCORES_SCHEMA, SCORING_FILE  # noqa: F401  (re-exported)
from openalign.errors import OpenAlignError
from openalign.files import atomic_write
from openalign.inference.embed import embed_to_folder
from openalign.inference.embedding_folder import (
    NonFiniteEmbeddingError,
    iter_embedding_parts,
    read_summary,
    write_model_reference,
)

EMBEDDINGS_FOLDER = "embeddings"
# filter --similarity's scores also hold each image's score against another pair's caption (scorer_check).
SIMILARITY_SCORES_SCHEMA = SCORES_SCHEMA.append(pa.field("shuffled_score", pa.float32()))


class CurationError(OpenAlignError, ValueError):
    """Curation cannot go on: a scoring folder that does not fit the run, a corpus with nothing to score, a
    source that changed since it was scored; the message names the folder, file or value."""


def check_scoring_model(folder: str | os.PathLike) -> Path:
    """The checkpoint folder as a Path, after checking it holds what scoring needs: config.json, tokenizer
    files and the image settings (preprocessor_config.json). Without them the pairs would be scored on
    align-base's 289 px pixels, which a model trained at another size has never seen."""
    from openalign.inference.encoders import EncoderLoadError, check_checkpoint_folder
    from openalign.processing.processor import read_image_settings

    folder = check_checkpoint_folder(folder)
    if read_image_settings(folder) is None:
        raise EncoderLoadError(
            f"model folder {folder} has no image settings (preprocessor_config.json): save the processor the "
            "model was trained with there (AlignProcessor.save_pretrained) before scoring with it"
        )
    return folder


def pair_items(source) -> Iterator[dict]:
    """The pairs of a source as embed items: the record's key, its caption and its image (bytes or path)."""
    from openalign.data.sources import iter_records

    for record in iter_records(source):
        image = record.image_bytes if record.image_bytes is not None else record.image_path
        yield {"source": record.key, "caption": record.caption, "image": image}


def _check_scoring_folder(out: Path, settings: dict, write: bool) -> None:
    """Write scoring.json (`write`: the rank that owns the folder) or check a rerun asks for the same."""
    path = out / SCORING_FILE
    if path.exists():
        existing = json.loads(path.read_text())
        if existing != settings:
            raise CurationError(f"{path} was scored with {existing}, this run asks for {settings}: use a fresh "
                                "--out, or re-threshold the existing scores with --scores-from")
    elif write:
        out.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n")
        os.replace(temporary, path)


def score_corpus(source, out_dir: str | os.PathLike, encoders, *, part_size: int = 10_000,
                 batch_size: int | None = None, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 progress: bool = False) -> dict | None:
    """Score every pair of `source` (a manifest or shard spec) into `out_dir` as the module docstring says.

    encoders: openalign.inference.encoders.Encoders (what `load_encoders` returns for a checkpoint that passes
    `check_scoring_model`). Under torchrun call it on every rank with that rank's number; the rank that finds
    every part done (rank 0 under torch.distributed) writes scores.parquet and returns the summary: scored and
    skipped counts, the skipped pairs with their reasons, and the paths. The other ranks return None.
    """
    from openalign.data.sources import check_source

    check_source(source)  # before the folder is created
    out = Path(out_dir)
    settings = {"model": str(Path(encoders.source).resolve()) if encoders.source else "", "part_size": part_size}
    _check_scoring_folder(out, settings, write=rank == 0)
    embed_summary = embed_to_folder(
        pair_items(source),
        {"image": encoders.encode_loaded_images, "text": encoders.encode_texts},
        out / EMBEDDINGS_FOLDER, kind="both", part_size=part_size,
        batch_size=batch_size or encoders.image_batch_size, rank=rank, world_size=world_size,
        num_workers=num_workers, progress=progress, model=encoders.source,
    )
    if embed_summary is None:
        return None
    if encoders.source:  # `openalign index` and `search` can then be pointed at the scored embeddings
        write_model_reference(out / EMBEDDINGS_FOLDER, encoders.source)
    write_scores(out / EMBEDDINGS_FOLDER, out / SCORES_FILE)
    return scoring_summary(out)


def pair_scores(image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> np.ndarray:
    """(N,) float32 cosines of row-aligned (N, D) L2-normalised embeddings: each row's dot product."""
    return np.einsum("nd,nd->n", image_embeddings.astype(np.float32), text_embeddings.astype(np.float32))


def write_scores(embeddings_folder: str | os.PathLike, path: str | os.PathLike) -> Path:
    """scores.parquet from a finished embedding folder of kind "both": one row group per part, written to a
    temporary name and renamed into place. Each pair's shuffled score pairs its image with the caption of
    another pair of the same part (NaN in a part of one pair), so it costs a permutation and dot products."""
    path = Path(path)

    def write(temporary: Path) -> None:
        parts = zip(iter_embedding_parts(embeddings_folder, "image"), iter_embedding_parts(embeddings_folder, "text"))
        with pq.ParquetWriter(temporary, SIMILARITY_SCORES_SCHEMA) as writer:
            for part, ((image, metadata), (text, _)) in enumerate(parts):
                scores = pair_scores(image, text)
                shuffled = (pair_scores(image, np.asarray(text)[shuffled_partners(len(text), part)])
                            if len(text) > 1 else np.full(len(text), np.nan, dtype=np.float32))
                writer.write_table(pa.table({
                    "index": metadata.column("index"), "key": metadata.column("source"),
                    "caption": metadata.column("caption"), "score": pa.array(scores, type=pa.float32()),
                    "shuffled_score": pa.array(shuffled, type=pa.float32()),
                }, schema=SIMILARITY_SCORES_SCHEMA))

    atomic_write(path, write, shared=True)
    return path


def scoring_summary(folder: str | os.PathLike) -> dict:
    """What a finished scoring folder holds: the model, scored and skipped counts, the skipped pairs (key and
    reason) and the paths of scores.parquet and the embeddings."""
    folder = Path(folder)
    if not (folder / SCORES_FILE).is_file():
        raise CurationError(f"{folder} holds no {SCORES_FILE}: score the corpus first (openalign filter "
                            "--similarity --model CKPT --out FOLDER)")
    settings = json.loads((folder / SCORING_FILE).read_text()) if (folder / SCORING_FILE).is_file() else {}
    if not (folder / EMBEDDINGS_FOLDER).is_dir() and settings.get("kind") == "pair_estimates":
        # A training run's per-pair estimates (openalign.train.pair_estimates): no embeddings behind them.
        return {"model": settings.get("model", ""), "scored": settings.get("scored", 0),
                "skipped": settings.get("unscored", 0), "skipped_pairs": settings.get("unscored_pairs", []),
                "scores": str(folder / SCORES_FILE), "embeddings": None}
    embed_summary = read_summary(folder / EMBEDDINGS_FOLDER)
    return {
        "model": settings.get("model", ""), "scored": embed_summary["count"],
        "skipped": embed_summary["num_skipped"], "skipped_pairs": embed_summary["skipped"],
        "scores": str(folder / SCORES_FILE), "embeddings": str(folder / EMBEDDINGS_FOLDER),
    }


def open_scores(folder: str | os.PathLike) -> pq.ParquetFile:
    """A scoring folder's scores.parquet, opened after checking that it is a Parquet file holding the scores'
    columns; a CurationError naming it (and saying how to rebuild it) otherwise."""
    path = Path(folder) / SCORES_FILE
    if not path.is_file():
        raise CurationError(f"{path} does not exist: score the corpus first (openalign filter --similarity)")
    try:
        scores_file = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        raise _damaged(path, error) from None
    missing = [name for name in SCORES_SCHEMA.names if name not in scores_file.schema_arrow.names]
    if missing:
        raise _damaged(path, f"no column {', '.join(missing)}")
    return scores_file


def score_columns(folder: str | os.PathLike) -> list[str]:
    """The columns a scoring folder's scores.parquet holds (a training run's estimates have no shuffled_score)."""
    return list(open_scores(folder).schema_arrow.names)


def iter_score_batches(folder: str | os.PathLike, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """The columns of scores.parquet, streamed in source order a batch at a time; damage found on the way is a
    CurationError naming the file."""
    scores_file = open_scores(folder)
    try:
        yield from scores_file.iter_batches(columns=columns, batch_size=65_536)
    except (pa.ArrowException, OSError) as error:
        raise _damaged(Path(folder) / SCORES_FILE, error) from None


def read_scores(folder: str | os.PathLike, columns=("index", "score")) -> dict[str, np.ndarray]:
    """Columns of a scoring folder's scores.parquet as numpy arrays (index int64, score float32), in source
    order. Keys and captions are left out by default: selection needs 12 bytes a pair, not the text. A score
    that is not finite (a file from elsewhere, or changed since) is a NonFiniteEmbeddingError naming the pair."""
    path = Path(folder) / SCORES_FILE
    scores_file = open_scores(folder)
    missing = sorted(set(columns) - set(scores_file.schema_arrow.names))
    if missing:
        raise CurationError(f"{path} has no {', '.join(missing)} column (written by an earlier version): score the "
                            "corpus again into a fresh folder")
    try:
        table = scores_file.read(columns=list(columns))
    except (pa.ArrowException, OSError) as error:
        raise _damaged(path, error) from None
    read = {name: table.column(name).to_numpy() for name in columns}
    if "score" in read and not np.isfinite(read["score"]).all():
        row = int(np.argmin(np.isfinite(read["score"])))
        key = scores_file.read(columns=["key"]).column(0)[row].as_py()
        raise NonFiniteEmbeddingError(f"{path}: the score of pair {row} ({key}) is not finite (NaN or infinity): "
                                      "score again with a sound checkpoint")
    return read


def _damaged(path: Path, error) -> CurationError:
    return CurationError(f"{path} is damaged ({error}): rerun the same `openalign filter --similarity` command "
                         "into its folder, which writes it again from the embeddings beside it")
