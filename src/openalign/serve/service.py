"""The search behind `openalign serve`: requests in clip-retrieval's JSON shapes, checked, answered from indexes.

`SearchService` holds one collection (an index per modality, "image" and/or "text") and the encoders, and
answers clip-retrieval's `/knn-service` and `/metadata` bodies as Python dicts; the web layer (app.py) only
moves JSON and bytes. Every field of a request is checked before any work (request_checks.py): a malformed one
raises `RequestError` naming the field, which the web layer answers with its status (400, 404, 413 or 503).

The model is called under one lock: a forward pass already uses every core through PyTorch's intra-op
threads, so concurrent forwards would only contend. Images (an upload, an item's file for its thumbnail) are
decoded in at most `ServeLimits.max_concurrent_images` requests at once, each holding its slot until its
image is encoded or shrunk: a decoded image is the one thing a small request can make large, so this bounds the
server's memory whatever arrives. FAISS searches, the memory-mapped stores and the Arrow metadata are read-only
and run concurrently.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from openalign.errors import ImageLoadError, OpenAlignError
from openalign.index.faiss_index import Index
from openalign.processing.images import DEFAULT_MAX_PIXELS
from openalign.serve.dedup import duplicate_positions
from openalign.serve.limits import ServeLimits
from openalign.serve.request_checks import (
    RequestError,
    bounded_count,
    decode_base64,
    field,
    unit_embedding,
)
from openalign.untrusted import is_regular_file

LOGGER = logging.getLogger("openalign.serve")
MODALITIES = ("image", "text")
# Fields clip-retrieval's clients send that select models this server does not have (aesthetic embeddings,
# safety and violence classifiers of CLIP ViT-B/32 and L/14); accepted and ignored, as clip-retrieval's own
# back end ignores them when it was started without those models.
IGNORED_FIELDS = ("aesthetic_score", "aesthetic_weight", "use_safety_model", "use_violence_detector")


class ServerStartError(OpenAlignError, RuntimeError):
    """The server cannot start: no index in the folder, a model that does not fit it, an address it cannot
    listen on."""


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
        raise ServerStartError(
            f"{index_dir} holds no index: expected index.json (a folder written by `openalign index`) or "
            "image/ and text/ index folders"
        )
    return indexes


def find_image_root(index: Index, index_dir: Path) -> Path | None:
    """The folder relative image paths in an index's metadata start from, found without the working directory.

    `openalign embed` records the paths as it was given them, relative to the folder it ran in; that folder is
    normally the project holding the index. The answer is the nearest folder at or above index_dir in which the
    first relative path names a file; None when there is no relative path, or no such folder.
    """
    if "source" not in index.metadata.column_names:
        return None
    sources = index.metadata.column("source").slice(0, 1000).to_pylist()
    relative = next((source for source in sources
                     if source and not Path(source).is_absolute() and "://" not in source), None)
    if relative is None:
        return None
    for folder in (index_dir.resolve(), *index_dir.resolve().parents):
        if is_regular_file(folder / relative):
            return folder
    LOGGER.warning("no folder at or above %s holds %s, the first relative image path of its metadata: items with "
                   "relative paths will have no thumbnail (start the server with --image-root)", index_dir, relative)
    return None


def model_label(reference: str | None) -> str | None:
    """How /healthz names the model: a hub id as it is, a local folder by its name only (a public page has no
    business showing where files lie on the server)."""
    if reference is None:
        return None
    path = Path(reference)
    return path.name if path.is_absolute() or path.exists() else reference


def _model_input_side(encoders) -> int | None:
    """The side, in pixels, the model's processor resizes an image to (None when it does not resize)."""
    processor = getattr(getattr(encoders, "processor", None), "image_processor", None)
    if processor is None or not getattr(processor, "do_resize", False):
        return None
    return max(processor.size.values())


class SearchService:
    """One searchable collection: indexes by modality, the encoders (or None), limits and thumbnails.

    index_dir names the collection in start-up errors and is where relative image paths are looked up from
    (find_image_root), unless image_root is given.
    """

    def __init__(self, indexes: Mapping[str, Index], encoders=None, *, name: str = "openalign", limits=None,
                 index_dir: str | Path | None = None, image_root: str | Path | None = None,
                 model_name: str | None = None, any_model: bool = False):
        if not indexes or set(indexes) - set(MODALITIES):
            raise ServerStartError(f"indexes must be keyed by {' and/or '.join(MODALITIES)}, got {sorted(indexes)}")
        self.indexes = dict(indexes)
        self.encoders = encoders
        self.name = name
        self.limits = limits or ServeLimits()
        self.model_name = model_label(model_name or getattr(encoders, "source", None))
        where = Path(index_dir) if index_dir is not None else None
        self._check_dimensions(where)
        if not any_model:
            self._check_model()
        self.image_roots = {
            modality: Path(image_root) if image_root is not None
            else (find_image_root(index, where) if where is not None else None)
            for modality, index in self.indexes.items()
        }
        self._query_image_side = _model_input_side(encoders)
        self._model_lock = threading.Lock()
        self._image_slots = threading.BoundedSemaphore(self.limits.max_concurrent_images)
        self.thumbnail = functools.lru_cache(maxsize=2048)(self._thumbnail)

    def _check_dimensions(self, index_dir: Path | None) -> None:
        """Refuse a model whose embeddings are not the size of the index's vectors (no query could be answered)."""
        model_dim = getattr(self.encoders, "dim", None)
        for modality, index in self.indexes.items():
            if model_dim is not None and model_dim != index.dim:
                folder = index_dir if index_dir is None or len(self.indexes) == 1 else index_dir / modality
                folder = "" if folder is None else f" {folder}"
                raise ServerStartError(
                    f"the model {self.model_name} gives {model_dim}-dimensional embeddings but the {modality} "
                    f"index{folder} holds {index.dim}-dimensional vectors: serve it with the model that embedded "
                    "it (its model.json, or --model)"
                )

    def _check_model(self) -> None:
        """Refuse a model other than the one the index's model.json records (its config and weights hashed): a
        model of the same size answers every query, with hits that mean nothing."""
        source = getattr(self.encoders, "source", None)
        for index in self.indexes.values() if source else ():
            mismatch = index.model_mismatch(source)
            if mismatch:
                raise ServerStartError(f"{mismatch}. Serve it with the model the embeddings were made with "
                                       "(--model), or pass --any-model to serve anyway")

    def _index(self, modality) -> Index:
        if modality not in MODALITIES:
            raise RequestError(f"modality must be one of {', '.join(MODALITIES)}, not {modality!r:.40}")
        if modality not in self.indexes:
            raise RequestError(f"this server holds no {modality} index (it has: {', '.join(self.indexes)})")
        return self.indexes[modality]

    def _check_name(self, body: Mapping) -> None:
        name = field(body, "indice_name", str, self.name)
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

    @contextlib.contextmanager
    def _image_slot(self):
        """Hold one of the max_concurrent_images slots, or answer 503 after waiting image_wait_seconds."""
        if not self._image_slots.acquire(timeout=self.limits.image_wait_seconds):
            raise RequestError(f"the server is busy with {self.limits.max_concurrent_images} images already; try "
                               "again in a few seconds", status=503)
        try:
            yield
        finally:
            self._image_slots.release()

    def _uploaded_image_vector(self, text: str) -> np.ndarray:
        from openalign.processing.images import load_image

        data = decode_base64(text, self.limits.max_upload_bytes)
        if len(data) > self.limits.max_upload_bytes:
            raise RequestError(f"image is larger than {self.limits.max_upload_bytes} bytes", status=413)
        with self._image_slot():
            try:
                image = load_image(data, max_pixels=self.limits.max_pixels, name="the uploaded image",
                                   reduce_to=self._query_image_side)
            except ImageLoadError as error:
                raise RequestError(str(error)) from error
            return self._encode("image", image)

    def query_vector(self, body: Mapping, index: Index, modality: str) -> tuple[str, np.ndarray]:
        """(query kind, (D,) float32 vector) of a /knn-service body: text, image, embedding_input or id."""
        if body.get("image_url"):
            raise RequestError("image_url is not fetched by this server (a request must not make it connect "
                               "elsewhere): send the image itself, base64-encoded, in image")
        if field(body, "use_mclip", bool, False):
            raise RequestError("use_mclip: this server has no multilingual text encoder; send text instead")
        given = [name for name in ("text", "image", "embedding_input", "id") if body.get(name) not in (None, "")]
        if len(given) != 1:
            raise RequestError("give exactly one of text, image (base64), embedding_input or id"
                               + (f", not {' and '.join(given)}" if given else ""))
        kind = given[0]
        if kind == "text":
            text = field(body, "text", str, "")
            if len(text) > self.limits.max_text_characters:
                raise RequestError(f"text is longer than {self.limits.max_text_characters} characters", status=413)
            return "text", self._encode("text", text)
        if kind == "image":
            if self.encoders is None:  # before decoding anything
                raise RequestError("this server was started without a model: image queries need --model")
            return "image", self._uploaded_image_vector(field(body, "image", str, ""))
        if kind == "embedding_input":
            return "embedding", unit_embedding(body["embedding_input"], index.dim)
        return "id", self._item_vector(field(body, "id", int, 0), index, modality)

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
        with self._image_slot():
            return self._encode("image", self._item_image(modality, item_id, row, self._query_image_side))

    def knn(self, body: Mapping, base_url: str = "") -> list[dict]:
        """Answer a /knn-service body: results best first, each with id, similarity, caption, the item's
        metadata and url, the address of its thumbnail (base_url + /thumbnail/MODALITY/ID)."""
        if not isinstance(body, Mapping):
            raise RequestError("the request body must be a JSON object")
        self._check_name(body)
        modality = field(body, "modality", str, "image")
        index = self._index(modality)
        num_images = bounded_count(body, "num_images", 40, self.limits.max_num_images)
        num_result_ids = max(num_images, bounded_count(body, "num_result_ids", num_images, self.limits.max_result_ids))
        deduplicate = field(body, "deduplicate", bool, False)
        _, vector = self.query_vector(body, index, modality)
        scores, ids, rows = index.search_vectors(vector[None], min(num_result_ids, len(index)))
        hits = rows[0]
        if deduplicate and len(hits) > 1:
            stored = index.stored_vectors([hit["id"] for hit in hits])
            if stored is not None:
                stored /= np.maximum(np.linalg.norm(stored, axis=1, keepdims=True), 1e-12)
                dropped = set(duplicate_positions(stored).tolist())
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
        index = self._index(field(body, "modality", str, next(iter(self.indexes))))
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

    def _item_image(self, modality: str, item_id: int, row: dict, reduce_to: int | None):
        """The image file an item's metadata names (never a path from a request), opened with the bomb guard; a
        relative path is taken from the collection's image root, never from the server's working directory."""
        from openalign.processing.images import load_image

        source = row.get("source")
        if not isinstance(source, str) or not source:
            raise RequestError(f"item {item_id} has no image file on this server", status=404)
        path = Path(source)
        if not path.is_absolute():
            root = self.image_roots.get(modality)
            if root is None:
                raise RequestError(f"item {item_id}'s image {source!r} is a relative path and no folder above the "
                                   "index holds it (start the server with --image-root)", status=404)
            path = root / path
        if not is_regular_file(path):
            raise RequestError(f"item {item_id} has no image file on this server", status=404)
        try:
            # The items are the collection's own images, which were embedded at the embedding limit.
            return load_image(path, max_pixels=DEFAULT_MAX_PIXELS, name=f"item {item_id}", reduce_to=reduce_to)
        except ImageLoadError as error:
            raise RequestError(str(error), status=404) from error

    def _thumbnail(self, modality: str, item_id: int) -> bytes:
        """JPEG thumbnail of an indexed item's image, by id (cached)."""
        index = self._index(modality)
        if not 0 <= item_id < len(index):
            raise RequestError(f"id {item_id} is not an item of the {modality} index", status=404)
        row = index.metadata.slice(item_id, 1).to_pylist()[0]
        size = self.limits.thumbnail_size
        with self._image_slot():
            image = self._item_image(modality, item_id, row, reduce_to=size)
            image.thumbnail((size, size))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        return buffer.getvalue()

    def describe(self) -> dict:
        """What /healthz reports: the collection's name, the model's name and each index's kind and size (no
        path of the server's files)."""
        return {
            "status": "ok",
            "name": self.name,
            "model": self.model_name,
            "indexes": {m: {"kind": i.plan.kind, "vectors": len(i), "dim": i.dim} for m, i in self.indexes.items()},
        }
