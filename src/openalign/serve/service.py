"""The search behind `openalign serve`: requests in clip-retrieval's JSON shapes, checked, answered from indexes.

`SearchService` holds one collection (an index per modality, "image" and/or "text") and the encoders, and
answers clip-retrieval's `/knn-service` and `/metadata` bodies as Python dicts; the web layer (app.py) only
moves JSON and bytes. Every field of a request is checked before any work: a malformed one raises
`RequestError` naming the field, which the web layer answers with its status (400, 404 or 413).

The model is called under one lock: a forward pass already uses every core through PyTorch's intra-op
threads, so concurrent forwards would only contend. FAISS searches, the memory-mapped stores and the Arrow
metadata are read-only and run concurrently.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import json
import math
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from openalign.errors import ImageLoadError, OpenAlignError
from openalign.index.faiss_index import Index

MODALITIES = ("image", "text")
# Fields clip-retrieval's clients send that select models this server does not have (aesthetic embeddings,
# safety and violence classifiers of CLIP ViT-B/32 and L/14); accepted and ignored, as clip-retrieval's own
# back end ignores them when it was started without those models.
IGNORED_FIELDS = ("aesthetic_score", "aesthetic_weight", "use_safety_model", "use_violence_detector")
DUPLICATE_THRESHOLD = 0.94  # clip-retrieval's: results closer than this to a better one are dropped


class RequestError(OpenAlignError, ValueError):
    """A request the server refuses; status is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ServeLimits:
    """Bounds on what one request may ask for or send."""

    max_upload_bytes: int = 8 * 2**20  # a decoded query image
    max_pixels: int = 40_000_000  # about 6300 x 6300; the header is checked before decoding
    max_text_characters: int = 2_000
    max_num_images: int = 1_000
    max_result_ids: int = 10_000
    max_metadata_ids: int = 1_000
    thumbnail_size: int = 256

    @property
    def max_body_bytes(self) -> int:
        """Largest request body: the base64 of the largest upload plus room for the other fields."""
        return 4 * math.ceil(self.max_upload_bytes / 3) + 64 * 1024


def load_indexes(index_dir: str | Path) -> dict[str, Index]:
    """{modality: Index} of an index folder written by `openalign index` (one modality, its embed_kind) or of
    a folder holding image/ and/or text/ index folders. Stores are memory-mapped where the kind allows."""
    index_dir = Path(index_dir)
    if (index_dir / "index.json").is_file():
        embed_kind = json.loads((index_dir / "index.json").read_text()).get("embed_kind", "image")
        return {embed_kind: Index.load(index_dir, memory_map=True)}
    indexes = {
        modality: Index.load(index_dir / modality, memory_map=True)
        for modality in MODALITIES
        if (index_dir / modality / "index.json").is_file()
    }
    if not indexes:
        raise RequestError(
            f"{index_dir} holds no index: expected index.json (a folder written by `openalign index`) or "
            "image/ and text/ index folders"
        )
    return indexes


def _field(body: Mapping, name: str, kind: type, default):
    value = body.get(name, default)
    if value is None:
        return default
    # bool is an int to Python; a JSON true is not a count of images.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RequestError(f"{name} must be {kind.__name__ if kind is not str else 'a string'}, not {value!r:.80}")
    return value


def _bounded_count(body: Mapping, name: str, default: int, most: int) -> int:
    value = _field(body, name, int, default)
    if not 1 <= value <= most:
        raise RequestError(f"{name} must be between 1 and {most}, not {value}")
    return value


def _decode_base64(text: str, limits: ServeLimits) -> bytes:
    if text.startswith("data:") and "," in text[:100]:  # a data: URL as browsers write them
        text = text.split(",", 1)[1]
    if len(text) > 4 * math.ceil(limits.max_upload_bytes / 3) + 4:
        raise RequestError(f"image is larger than {limits.max_upload_bytes} bytes", status=413)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise RequestError(f"image is not valid base64 ({error})") from error


def _duplicates(vectors: np.ndarray) -> set[int]:
    """Positions to drop: every member of a connected group of results closer than DUPLICATE_THRESHOLD except
    the best ranked (clip-retrieval's deduplication)."""
    similar = (vectors @ vectors.T) > DUPLICATE_THRESHOLD
    parent = list(range(len(vectors)))

    def root(node):
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for first, second in zip(*np.nonzero(np.triu(similar, 1))):
        low, high = sorted((root(first), root(second)))
        parent[high] = low
    return {position for position in range(len(vectors)) if root(position) != position}


class SearchService:
    """One searchable collection: indexes by modality, the encoders (or None), limits and thumbnails."""

    def __init__(self, indexes: Mapping[str, Index], encoders=None, *, name: str = "openalign", limits=None):
        if not indexes or set(indexes) - set(MODALITIES):
            raise RequestError(f"indexes must be keyed by {' and/or '.join(MODALITIES)}, got {sorted(indexes)}")
        self.indexes = dict(indexes)
        self.encoders = encoders
        self.name = name
        self.limits = limits or ServeLimits()
        self._model_lock = threading.Lock()
        self.thumbnail = functools.lru_cache(maxsize=2048)(self._thumbnail)

    def _index(self, modality) -> Index:
        if modality not in MODALITIES:
            raise RequestError(f"modality must be one of {', '.join(MODALITIES)}, not {modality!r:.40}")
        if modality not in self.indexes:
            raise RequestError(f"this server holds no {modality} index (it has: {', '.join(self.indexes)})")
        return self.indexes[modality]

    def _check_name(self, body: Mapping) -> None:
        name = _field(body, "indice_name", str, self.name)
        if name != self.name:
            raise RequestError(f"no index named {name!r:.80}: this server holds {self.name!r}", status=404)

    def _encode(self, kind: str, payload) -> np.ndarray:
        if self.encoders is None:
            raise RequestError(f"this server was started without a model: {kind} queries need --model")
        with self._model_lock:
            if kind == "text":
                embedding = self.encoders.encode_texts([payload])
            else:
                embedding = self.encoders.encode_loaded_images([payload])
        return embedding.detach().float().cpu().numpy()[0] if hasattr(embedding, "detach") else embedding[0]

    def _image(self, data: bytes, name: str):
        from openalign.processing.images import load_image

        if len(data) > self.limits.max_upload_bytes:
            raise RequestError(f"image is larger than {self.limits.max_upload_bytes} bytes", status=413)
        try:
            return load_image(data, max_pixels=self.limits.max_pixels, name=name)
        except ImageLoadError as error:
            raise RequestError(str(error)) from error

    def query_vector(self, body: Mapping, index: Index, modality: str) -> tuple[str, np.ndarray]:
        """(query kind, (D,) float32 vector) of a /knn-service body: text, image, embedding_input or id."""
        if body.get("image_url"):
            raise RequestError("image_url is not fetched by this server (a request must not make it connect "
                               "elsewhere): send the image itself, base64-encoded, in image")
        if _field(body, "use_mclip", bool, False):
            raise RequestError("use_mclip: this server has no multilingual text encoder; send text instead")
        given = [name for name in ("text", "image", "embedding_input", "id") if body.get(name) not in (None, "")]
        if len(given) != 1:
            raise RequestError("give exactly one of text, image (base64), embedding_input or id"
                               + (f", not {' and '.join(given)}" if given else ""))
        kind = given[0]
        if kind == "text":
            text = _field(body, "text", str, "")
            if len(text) > self.limits.max_text_characters:
                raise RequestError(f"text is longer than {self.limits.max_text_characters} characters", status=413)
            return "text", self._encode("text", text)
        if kind == "image":
            data = _decode_base64(_field(body, "image", str, ""), self.limits)
            return "image", self._encode("image", self._image(data, "the uploaded image"))
        if kind == "embedding_input":
            return "embedding", self._embedding(body["embedding_input"], index.dim)
        return "id", self._item_vector(_field(body, "id", int, 0), index, modality)

    @staticmethod
    def _embedding(values, dim: int) -> np.ndarray:
        if not isinstance(values, list) or len(values) != dim:
            raise RequestError(f"embedding_input must be a list of {dim} numbers")
        if not all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in values):
            raise RequestError("embedding_input must hold numbers only")
        vector = np.asarray(values, dtype=np.float32)
        if not np.all(np.isfinite(vector)) or not np.any(vector):
            raise RequestError("embedding_input must be finite and not all zero")
        return vector

    def _item_vector(self, item_id: int, index: Index, modality: str) -> np.ndarray:
        """The stored vector of an indexed item, or (for codes that cannot be decoded) its re-encoded source."""
        if not 0 <= item_id < len(index):
            raise RequestError(f"id {item_id} is not an item of the {modality} index (0..{len(index) - 1})", 404)
        stored = index.stored_vectors([item_id])
        if stored is not None:
            return stored[0]
        row = index.metadata.slice(item_id, 1).to_pylist()[0]
        if modality == "text" and row.get("caption"):
            return self._encode("text", row["caption"])
        return self._encode("image", self._item_image(item_id, row))

    def knn(self, body: Mapping, base_url: str = "") -> list[dict]:
        """Answer a /knn-service body: results best first, each with id, similarity, caption, the item's
        metadata and url, the address of its thumbnail (base_url + /thumbnail/MODALITY/ID)."""
        if not isinstance(body, Mapping):
            raise RequestError("the request body must be a JSON object")
        self._check_name(body)
        modality = _field(body, "modality", str, "image")
        index = self._index(modality)
        num_images = _bounded_count(body, "num_images", 40, self.limits.max_num_images)
        num_result_ids = max(num_images, _bounded_count(body, "num_result_ids", num_images, self.limits.max_result_ids))
        deduplicate = _field(body, "deduplicate", bool, False)
        _, vector = self.query_vector(body, index, modality)
        scores, ids, rows = index.search_vectors(vector[None], min(num_result_ids, len(index)))
        hits = rows[0]
        if deduplicate and len(hits) > 1:
            stored = index.stored_vectors([hit["id"] for hit in hits])
            if stored is not None:
                stored /= np.maximum(np.linalg.norm(stored, axis=1, keepdims=True), 1e-12)
                dropped = _duplicates(stored)
                hits = [hit for position, hit in enumerate(hits) if position not in dropped]
        results = []
        for hit in hits[:num_images]:
            result = {key: value for key, value in hit.items() if key != "score"}
            result.update(similarity=hit["score"], url=f"{base_url}/thumbnail/{modality}/{hit['id']}")
            results.append(result)
        return results

    def metadata(self, body: Mapping) -> list[dict]:
        """Answer a /metadata body {"ids": [...], "indice_name"}: [{"id", "metadata": {...}}] in the ids' order."""
        if not isinstance(body, Mapping):
            raise RequestError("the request body must be a JSON object")
        self._check_name(body)
        index = self._index(_field(body, "modality", str, next(iter(self.indexes))))
        ids = body.get("ids")
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise RequestError("ids must be a list of item ids")
        if len(ids) > self.limits.max_metadata_ids:
            raise RequestError(f"at most {self.limits.max_metadata_ids} ids per request, not {len(ids)}", status=413)
        outside = [i for i in ids if not 0 <= i < len(index)]
        if outside:
            raise RequestError(f"ids {outside[:5]} are not items of this index (0..{len(index) - 1})", status=404)
        rows = index.metadata.take(ids).to_pylist() if ids else []
        return [{"id": item_id, "metadata": row} for item_id, row in zip(ids, rows)]

    def _item_image(self, item_id: int, row: dict):
        """The image file an item's metadata names (never a path from a request), opened with the bomb guard."""
        source = row.get("source")
        if not isinstance(source, str) or not os.path.isfile(source):
            raise RequestError(f"item {item_id} has no image file on this server", status=404)
        try:
            from openalign.processing.images import load_image

            return load_image(source, max_pixels=self.limits.max_pixels, name=f"item {item_id}")
        except ImageLoadError as error:
            raise RequestError(str(error), status=404) from error

    def _thumbnail(self, modality: str, item_id: int) -> bytes:
        """JPEG thumbnail of an indexed item's image, by id (cached)."""
        index = self._index(modality)
        if not 0 <= item_id < len(index):
            raise RequestError(f"id {item_id} is not an item of the {modality} index", status=404)
        image = self._item_image(item_id, index.metadata.slice(item_id, 1).to_pylist()[0])
        image.thumbnail((self.limits.thumbnail_size, self.limits.thumbnail_size))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        return buffer.getvalue()

    def describe(self) -> dict:
        """What /healthz reports: the collection's name and each index's kind and size."""
        return {
            "status": "ok",
            "name": self.name,
            "model": getattr(self.encoders, "source", None),
            "indexes": {m: {"kind": i.plan.kind, "vectors": len(i), "dim": i.dim} for m, i in self.indexes.items()},
        }
