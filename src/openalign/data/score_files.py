"""The per-pair scores file, one format for every writer: `openalign filter --similarity` (each pair's
image-text cosine under a checkpoint, openalign.curation.scores) and a training run's per-pair clean estimates
(openalign.train.pair_estimates). A scoring folder holds:

    scores.parquet   one row per scored pair, in source order: index (its position in the source stream), key
                     (the source's own key), caption, score (float32, higher is more likely a good pair); a
                     writer may add columns after these
    scoring.json     what scored them (the model, or the run and step), read by `filter --scores-from`

so `openalign filter --scores-from FOLDER --keep-fraction F` and the report and histogram work on either.
"""

from __future__ import annotations

import pyarrow as pa

SCORES_FILE = "scores.parquet"
SCORING_FILE = "scoring.json"
SCORES_SCHEMA = pa.schema([("index", pa.int64()), ("key", pa.string()), ("caption", pa.string()),
                           ("score", pa.float32())])
