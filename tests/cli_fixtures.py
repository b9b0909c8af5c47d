"""A tiny trained-looking checkpoint folder (model + processor) and small images for the command tests."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from openalign.model_config import get_preset
from openalign.models.align import AlignModel
from openalign.models.utils import trainable_init
from openalign.processing.image_processor import AlignImageProcessor
from openalign.processing.processor import AlignProcessor
from openalign.processing.tokenizer import train_wordpiece

CAPTIONS = [
    "a photo of a red square", "a blue circle on grass", "a green triangle", "a dog on the beach",
    "a cat sleeping on a sofa", "a red bicycle in the street", "two dogs and a cat", "a yellow car",
    "a photo of a blue sky", "the origami bird", "a drawing of a house", "a close-up photo of a flower",
]


def make_checkpoint(folder: Path, seed: int = 0, temperature: float = 0.07) -> Path:
    """Save a 32 px tiny AlignModel with a WordPiece vocabulary trained on CAPTIONS, and its processor."""
    tokenizer = train_wordpiece(CAPTIONS * 4, vocab_size=120, min_frequency=1)
    config = get_preset("tiny")
    config = config.replace(
        vision_config=config.vision_config.replace(image_size=32),
        text_config=config.text_config.replace(vocab_size=tokenizer.vocab_size),
    )
    torch.manual_seed(seed)
    model = AlignModel(config)
    trainable_init(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            # Non-trivial BatchNorm variances, so folding them into the convolutions is exercised (a random
            # running mean would add a constant that drowns the untrained trunk's small features).
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) * 0.5 + 0.75)
        for module in model.text_model.modules():
            # BERT's 0.02 init gives every text nearly the same [CLS] state; a wider one tells texts apart.
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.normal_(0.0, 0.3, generator=generator)
        model.temperature.fill_(temperature)
    model.eval().save_pretrained(folder)
    image_processor = AlignImageProcessor(size={"height": 36, "width": 36}, crop_size={"height": 32, "width": 32})
    AlignProcessor(tokenizer, image_processor).save_pretrained(folder)
    return folder


def make_images(folder: Path, count: int, seed: int = 0, size=(40, 40), suffix: str = ".png") -> list[Path]:
    """count random-noise images of distinct content, named image-000.png, ..."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        path = folder / f"image-{index:03d}{suffix}"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


@functools.lru_cache(maxsize=4)
def _plain_model_and_processor(folder: Path):
    return AlignModel.from_pretrained(folder).eval(), AlignProcessor.from_pretrained(folder)


def direct_image_embeddings(folder: Path, paths) -> torch.Tensor:
    """Oracle: normalised image embeddings from the plain AlignModel and processor, one call, no batching."""
    model, processor = _plain_model_and_processor(Path(folder))
    with torch.no_grad():
        features = model.get_image_features(processor(images=[str(path) for path in paths])["pixel_values"])
    return torch.nn.functional.normalize(features, dim=-1)


def direct_text_embeddings(folder: Path, texts) -> torch.Tensor:
    """Oracle: normalised text embeddings from the plain AlignModel, every text padded to max_length."""
    model, processor = _plain_model_and_processor(Path(folder))
    batch = processor(text=list(texts), padding="max_length")
    with torch.no_grad():
        features = model.get_text_features(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    return torch.nn.functional.normalize(features, dim=-1)


def make_hub_cache(cache: Path, repo_id: str, folder: Path) -> Path:
    """A stand-in for the Hugging Face hub: `folder`'s files as huggingface_hub's cache holds a downloaded
    snapshot of `repo_id` (models--OWNER--NAME/snapshots/COMMIT/ and refs/main), so that with HF_HUB_CACHE set to
    `cache` and HF_HUB_OFFLINE=1 the id resolves without a network."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    repository = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repository / "snapshots" / commit)
    (repository / "refs").mkdir(parents=True)
    (repository / "refs" / "main").write_text(commit)
    return cache
