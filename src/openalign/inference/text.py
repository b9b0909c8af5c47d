"""Embedding many texts: sort by token count, pad each batch to its own longest, restore the caller's order.

Captions are short and vary (alt-texts: 6-22 words, 10-35 tokens); padding every batch to 64 tokens, as
ALIGN's processor does by default, spends most of the text tower on padding, and padding to the longest of an
unsorted batch still pays for the one long caption in it. Sorting first makes every batch nearly rectangular.
Attention masks keep padded positions out of the result, so the embeddings do not depend on the batching
(tests check this against one text at a time).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from openalign.inference.optimize import default_batch_size
from openalign.processing.processor import AlignProcessor


def _bucketed_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices sorted by length (longest first, so the largest batch shape comes first and is the one the
    allocator keeps), cut into batches of batch_size."""
    order = sorted(range(len(lengths)), key=lambda index: -lengths[index])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def embed_texts(
    model,
    tokenizer,
    texts: Sequence[str],
    batch_size: int | None = None,
    max_length: int | None = None,
) -> torch.Tensor:
    """(N, D) float32 unnormalised text embeddings of `texts`, in their order.

    model: anything with `get_text_features(input_ids, attention_mask, token_type_ids)` (an AlignModel or its
    `optimize_for_inference()` copy). tokenizer: an `AlignTokenizer` (or `AlignProcessor`, whose tokenizer is
    used). Texts are tokenized once without padding, sorted by token count, batched, padded to the longest of
    each batch, embedded, and put back in order. batch_size defaults to `default_batch_size("text")`.
    """
    if isinstance(tokenizer, AlignProcessor):
        tokenizer = tokenizer.tokenizer
    texts = list(texts)
    if not texts:
        raise ValueError("embed_texts needs at least one text")
    device = getattr(model, "device", torch.device("cpu"))
    batch_size = batch_size or default_batch_size("text", device)
    encoded = tokenizer(texts, padding="do_not_pad", max_length=max_length, return_tensors=None)
    lengths = [len(ids) for ids in encoded["input_ids"]]
    pad_id = tokenizer.pad_token_id
    result: torch.Tensor | None = None
    for indices in _bucketed_batches(lengths, batch_size):
        longest = max(lengths[index] for index in indices)
        batch = {key: torch.full((len(indices), longest), pad_id if key == "input_ids" else 0, dtype=torch.long)
                 for key in ("input_ids", "token_type_ids", "attention_mask")}
        for row, index in enumerate(indices):
            for key in batch:
                values = encoded[key][index]
                batch[key][row, : len(values)] = torch.as_tensor(values, dtype=torch.long)
        with torch.inference_mode():
            features = model.get_text_features(
                batch["input_ids"], attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"]
            ).float()
        if result is None:
            result = torch.empty(len(texts), features.shape[1], dtype=torch.float32)
        result[torch.as_tensor(indices)] = features.cpu()
    return result
