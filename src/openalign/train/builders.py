"""Building what a TrainConfig describes: the model (from a preset, config.json or checkpoints, towers
optionally started from their own checkpoints), its contrastive loss, and the resumable train / validation
loaders."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from PIL import Image

from openalign.data.dataset import ImageTextDataset, TrainTransform, make_loader
from openalign.errors import CheckpointError, ConfigError
from openalign.losses import ContrastiveLoss, loss_class
from openalign.model_config import AlignConfig, AlignTextConfig, AlignVisionConfig, get_preset
from openalign.models.align import AlignModel
from openalign.models.utils import trainable_init
from openalign.pretrained import load_into, read_config, read_state_dict, resolve_folder, translate_state_dict
from openalign.processing.image_processor import AlignImageProcessor
from openalign.processing.processor import AlignProcessor
from openalign.processing.tokenizer import AlignTokenizer
from openalign.train.config import LossSection, TrainConfig


def _read_align_config(path: str) -> AlignConfig:
    path = Path(path)
    return AlignConfig.from_json_file(path / "config.json" if path.is_dir() else path)


def _load_tower(model: AlignModel, tower: str, source: str) -> None:
    """Copy a tower's weights from an ALIGN checkpoint or (text) a plain BERT folder; the pooler may be absent,
    nothing else may."""
    folder = resolve_folder(source)
    config_class = AlignTextConfig if tower == "text_model" else AlignVisionConfig
    full_state = read_state_dict(folder)
    report = load_into(getattr(model, tower), translate_state_dict(full_state, config_class),
                       source=str(folder), strict=False)
    missing = [key for key in report.missing if not key.startswith("pooler.")]
    if missing or report.mismatched:
        raise CheckpointError(f"cannot start {tower} from {folder}: {report.describe(str(folder))}")
    if tower == "text_model" and "text_projection.weight" in full_state:  # an ALIGN checkpoint: its head too
        load_into(model.text_projection, {key.split(".", 1)[1]: value for key, value in full_state.items()
                                          if key.startswith("text_projection.")}, source=str(folder))


def build_model(config: TrainConfig, vocab_size: int | None = None) -> AlignModel:
    """The AlignModel a config asks for, in training mode: from a checkpoint, or from a preset / config.json
    with `trainable_init` on towers not started from a checkpoint, then optional tower checkpoints."""
    section = config.model
    if section.init_from:
        model = AlignModel.from_pretrained(section.init_from).train()
    else:
        align_config = _read_align_config(section.config) if section.config else get_preset(section.preset)
        text_config, vision_config = align_config.text_config, align_config.vision_config
        if section.text_init:
            text_config = read_config(resolve_folder(section.text_init), AlignTextConfig)
        elif vocab_size is not None:
            text_config = text_config.replace(vocab_size=vocab_size)  # a fresh text tower fits the tokenizer
        if section.vision_init:
            vision_config = read_config(resolve_folder(section.vision_init), AlignVisionConfig)
        if config.data.image_size:
            vision_config = vision_config.replace(image_size=config.data.image_size)
        if section.batch_norm_momentum is not None:
            vision_config = vision_config.replace(batch_norm_momentum=section.batch_norm_momentum)
        align_config = AlignConfig(
            text_config=text_config, vision_config=vision_config, projection_dim=vision_config.output_channels,
            temperature_init_value=align_config.temperature_init_value,
            initializer_range=align_config.initializer_range,
        )
        model = AlignModel(align_config)
        trainable_init(model.vision_model, residual_gain=section.residual_gain)
        if section.text_init:
            _load_tower(model, "text_model", section.text_init)
        if section.vision_init:
            _load_tower(model, "vision_model", section.vision_init)
    if section.temperature_init is not None:
        model.config.temperature_init_value = section.temperature_init
        with torch.no_grad():
            model.temperature.fill_(section.temperature_init)
    model_vocab = model.config.text_config.vocab_size
    if vocab_size is not None and vocab_size > model_vocab:
        raise ConfigError(f"the tokenizer has {vocab_size} tokens but the text tower only {model_vocab} "
                          "embeddings; use a matching data.tokenizer or model")
    return model


def build_contrastive_loss(loss: LossSection, model: AlignModel) -> ContrastiveLoss:
    """The contrastive loss a config's loss section names, for `model`: built from the model's starting
    temperature, and attached to it (a loss that owns its scale stops the model's temperature from training;
    call this before building the optimiser and the DDP/FSDP wrapper)."""
    contrastive_loss = loss_class(loss.name).from_config(loss, float(model.temperature.detach()))
    contrastive_loss.attach(model)
    return contrastive_loss


@functools.lru_cache(maxsize=8)
def _eval_processor(resize: int, crop: int) -> AlignImageProcessor:
    return AlignImageProcessor.for_image_size(crop, resize)


def eval_transform(image: Image.Image, *, resize: int, crop: int) -> torch.Tensor:
    """Validation pixels (3, crop, crop): square resize, centre crop, scale to [-1, 1], through the evaluation
    processor (`AlignImageProcessor`, align-base's settings at these sizes)."""
    return _eval_processor(resize, crop).preprocess_image(image)


def run_processor(config: TrainConfig, tokenizer: AlignTokenizer, image_size: int) -> AlignProcessor:
    """The processor a run's model is used with, saved beside its weights in model/ and every checkpoint: the
    run's tokenizer, cutting texts where training cut them (data.max_length, saved as model_max_length), and
    the validation image settings (the resize, then the centre crop of the size the model trained at)."""
    data = config.data
    text = AlignTokenizer(tokenizer.tokenizer, {**tokenizer.config, "model_max_length": data.max_length},
                          max_length=data.max_length)
    return AlignProcessor(text, AlignImageProcessor.for_image_size(image_size, data.resize))


def build_loaders(config: TrainConfig, tokenizer: AlignTokenizer, image_size: int, pin_memory: bool = False):
    """(train loader, validation loader or None): resumable loaders of tokenized, augmented batches."""
    data = config.data
    resize = AlignImageProcessor.for_image_size(image_size, data.resize).size["height"]  # align-base's ratio
    padding = "max_length" if config.run.compile else "longest"  # compiled graphs want one text length
    tokenize = functools.partial(tokenizer, padding=padding, max_length=data.max_length)
    if not data.train:
        raise ConfigError("data.train is empty: give a manifest, image folder or shard spec")
    train_set = ImageTextDataset(
        data.train, transform=TrainTransform(resize=resize, crop=image_size),
        tokenize=tokenize, seed=config.run.seed, shuffle_buffer=data.shuffle_buffer, resampled=data.resampled,
        flip=data.flip, epoch_size=data.epoch_size, cache_images=data.cache_images,
        group_by=data.group_by, group_size=data.group_size,
        group_fraction=data.group_fraction, group_from_epoch=data.group_from_epoch,
    )
    # Its own generator: otherwise each new iterator draws a seed from the global RNG, and a resumed run, which
    # starts its iterator at a different moment, would see different dropout masks.
    train_loader = make_loader(train_set, config.optim.batch_size, data.num_workers, drop_last=True,
                               generator=torch.Generator(), pin_memory=pin_memory)
    if train_loader.batches_per_epoch() == 0:
        raise ConfigError(f"{data.train}: {train_set.num_samples} samples give no full batch of "
                          f"{config.optim.batch_size} per process; lower optim.batch_size")
    val_loader = None
    if data.val:
        val_transform = functools.partial(eval_transform, resize=resize, crop=image_size)
        val_set = ImageTextDataset(data.val, transform=val_transform, tokenize=tokenize, shuffle=False, flip=False)
        if val_set.num_samples > data.val_max_samples:
            val_set = ImageTextDataset(data.val, transform=val_transform, tokenize=tokenize, shuffle=False,
                                       flip=False, epoch_size=data.val_max_samples)
        val_loader = make_loader(val_set, config.optim.batch_size, 0, generator=torch.Generator())
    return train_loader, val_loader
