"""A trained ALIGN checkpoint ready to embed: the model and its processor behind two calls.

`load_encoders(folder)` reads the model (config.json + weights) and the processor (tokenizer files and
preprocessor_config.json) from one checkpoint folder. `Encoders.encode_images(sources)` and
`Encoders.encode_texts(texts)` return L2-normalised float32 (N, D) embeddings; every user-facing command
(zero-shot, embed, search, eval, compare) goes through them, so all commands embed alike.

Images are decoded with `openalign.processing.images.load_image` (EXIF orientation, mode conversion; an
unreadable file raises ImageLoadError naming it) one batch at a time, so memory does not grow with the number
of sources. Texts go through `openalign.inference.text.embed_texts`: sorted by token count, each batch padded
to its own longest, then put back in order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from openalign.errors import OpenAlignError
from openalign.inference.optimize import default_batch_size
from openalign.inference.text import embed_texts

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")


class EncoderLoadError(OpenAlignError, ValueError):
    """A checkpoint folder cannot serve as encoders (missing tokenizer files, unknown dtype or device)."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" is the first CUDA device when there is one, else the CPU; anything else is passed to torch."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise EncoderLoadError(f"device {device!r} is not a torch device ({error})") from error
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise EncoderLoadError(f"device {device!r}: no CUDA device is visible (this PyTorch build: "
                                   f"{'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU only'}); "
                                   "use --device cpu or auto")
        if resolved.index is not None and resolved.index >= count:
            raise EncoderLoadError(f"device {device!r}: only {count} CUDA device(s) are visible")
    return resolved


@dataclass
class Encoders:
    """A model with `get_image_features` / `get_text_features` plus the processor that feeds it.

    temperature: the model's raw divisor (logits = cosine / temperature), for turning similarities into
    probabilities. image_batch_size / text_batch_size: items per forward pass.
    """

    model: torch.nn.Module
    processor: object
    device: torch.device
    temperature: float
    image_batch_size: int
    text_batch_size: int
    source: str = ""

    def encode_loaded_images(self, images: Sequence) -> torch.Tensor:
        """(N, D) L2-normalised float32 embeddings of already-loaded RGB PIL images (one forward per batch)."""
        images = list(images)
        if not images:
            raise EncoderLoadError("encode_images needs at least one image")
        chunks = []
        for start in range(0, len(images), self.image_batch_size):
            pixel_values = self.processor.image_processor(images[start : start + self.image_batch_size])
            with torch.inference_mode():
                features = self.model.get_image_features(pixel_values.to(self.device)).float().cpu()  # (B, D)
            chunks.append(torch.nn.functional.normalize(features, dim=-1))
        return torch.cat(chunks)

    def encode_images(self, sources: Sequence) -> torch.Tensor:
        """(N, D) L2-normalised float32 embeddings of image paths, bytes or PIL images, in their order.

        Sources are decoded a batch at a time; an unreadable one raises ImageLoadError naming it.
        """
        # The image processor decodes through load_image itself, so passing sources keeps one batch decoded.
        return self.encode_loaded_images(sources)

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) L2-normalised float32 embeddings of texts, in their order (length-bucketed batches)."""
        texts = list(texts)
        if not texts:
            raise EncoderLoadError("encode_texts needs at least one text")
        features = embed_texts(self.model, self.processor.tokenizer, texts, batch_size=self.text_batch_size)
        return torch.nn.functional.normalize(features, dim=-1)

    @property
    def dim(self) -> int:
        """Embedding dimension D."""
        return int(self.model.config.projection_dim)


def check_checkpoint_folder(folder_or_hub_id: str | Path) -> Path:
    """The model's folder, after checking it holds a config, and tokenizer files the processor can read.

    A local folder is taken as it is; a hub id such as "kakaobrain/align-base" is downloaded, or found in the
    local cache (`openalign.hub.resolve_folder`, the one place every command resolves a model)."""
    from openalign.pretrained import resolve_folder

    folder = resolve_folder(folder_or_hub_id)
    if not (folder / "config.json").is_file():
        raise EncoderLoadError(f"model folder {folder} has no config.json")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise EncoderLoadError(
            f"model folder {folder} has no tokenizer ({' or '.join(TOKENIZER_FILES)}): save the processor there "
            "too (AlignProcessor.save_pretrained) or copy the tokenizer files of the run that trained it"
        )
    return folder


def load_encoders(
    model_path: str | Path,
    device: str | torch.device = "auto",
    dtype: str = "float32",
    batch_size: int | None = None,
    optimize: bool = True,
) -> Encoders:
    """Encoders for a checkpoint folder (or a hub id) holding the model and its processor files.

    dtype: "float32" or "bfloat16" (weights and activations; embeddings come back float32). optimize: use
    `AlignModel.optimize_for_inference` (BatchNorm folded, fused attention; float rounding only), else the
    plain model in eval mode. batch_size: items per forward for both towers; by default the tuned
    `default_batch_size` of each tower on this device.
    """
    from openalign.models.align import AlignModel
    from openalign.processing.processor import AlignProcessor

    if dtype not in DTYPES:
        raise EncoderLoadError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    folder = check_checkpoint_folder(model_path)
    device = resolve_device(device)
    processor = AlignProcessor.from_pretrained(folder)
    model = AlignModel.from_pretrained(folder, device=device)
    temperature = float(model.temperature.detach().float())
    if optimize:
        model = model.optimize_for_inference(dtype=DTYPES[dtype])
    else:
        model = _PlainModel(model.to(dtype=DTYPES[dtype]).eval())
    return Encoders(
        model=model,
        processor=processor,
        device=device,
        temperature=temperature,
        image_batch_size=batch_size or default_batch_size("image", device),
        text_batch_size=batch_size or default_batch_size("text", device),
        source=str(folder),
    )


class _PlainModel(torch.nn.Module):
    """An AlignModel as the encoders call it: inputs cast to its dtype and device, outputs float32."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.inner = model
        self.config = model.config
        self.dtype = next(model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.inner.parameters()).device

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.inner.get_image_features(pixel_values.to(self.device, self.dtype)).float()

    def get_text_features(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        device = self.device
        with torch.inference_mode():
            return self.inner.get_text_features(
                input_ids.to(device), attention_mask.to(device), token_type_ids.to(device)
            ).float()
