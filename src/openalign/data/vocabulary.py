"""A WordPiece vocabulary from the captions of any data source: what `openalign tokenizer train` runs.

Captions are read through `openalign.data.sources.iter_records`, so a manifest gives its caption column (never
its keys or file names), shards their .txt or .json captions, an image folder its sidecar captions, and a .txt
file one caption a line: whatever training reads, the tokenizer learns from.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

from openalign.data.sources import DataError, iter_records
from openalign.errors import TextInputError
from openalign.processing.tokenizer import AlignTokenizer, train_wordpiece


def source_captions(sources: str | os.PathLike | Sequence) -> Iterator[str]:
    """The caption of every record of `sources` (one source or a list), in order; records without one are
    passed over."""
    sources = list(sources) if isinstance(sources, (list, tuple)) else [sources]
    for source in sources:
        for record in iter_records(source):
            if record.caption and record.caption.strip():
                yield record.caption


def train_tokenizer(sources: str | os.PathLike | Sequence, vocab_size: int, out_dir: str | os.PathLike | None = None,
                    *, min_frequency: int = 2, lowercase: bool = True, show_progress: bool = False) -> AlignTokenizer:
    """Train a BERT WordPiece vocabulary on the captions of `sources` (see `train_wordpiece`), saved to out_dir
    when given. Raises DataError naming the sources when they hold no caption at all."""
    try:
        return train_wordpiece(source_captions(sources), vocab_size, out_dir, min_frequency=min_frequency,
                               lowercase=lowercase, show_progress=show_progress)
    except TextInputError as error:
        if "no token learned" not in str(error):
            raise
        # Nothing learnt: the sources hold no caption, and here they can be named.
        names = ", ".join(map(str, sources if isinstance(sources, (list, tuple)) else [sources]))
        raise DataError(f"{names}: no captions to learn a vocabulary from (a manifest needs a caption column "
                        "such as 'caption' or 'text'; an image folder, <image>.txt files beside the images)") from None
