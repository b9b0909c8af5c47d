"""ONNX export of each tower, checked against PyTorch with onnxruntime.

`export_onnx(model, out_dir)` writes

    vision.onnx   pixel_values (batch, 3, H, W) float32            -> image_embeds (batch, D) float32
    text.onnx     input_ids, attention_mask, token_type_ids         -> text_embeds (batch, D) float32
                  (batch, sequence) int64
    export.json   opset, input / output names, image size, and the check results

and, given the model's processor, what turns a photo or a caption into those inputs without openalign:

    tokenizer.json, vocab.txt, tokenizer_config.json   the WordPiece tokenizer (`tokenizers`, or transformers)
    preprocessor_config.json (+ processor_config.json)  the image settings: resize, centre crop, rescale
    example.py    EXAMPLE below: onnxruntime, tokenizers, Pillow and numpy embed a photo and captions

from the float32 inference copy (BatchNorm folded, fused QKV, [CLS]-only last layer): the graphs compute the
same unnormalised embeddings as `AlignModel.get_image_features` / `get_text_features`. Batch is dynamic in
both, sequence length in the text graph.

It uses the TorchScript-based exporter (`dynamo=False`), which needs no extra package. Exporting changes
glibc's dynamic mmap threshold in the exporting process (it allocates and frees very large blocks), which
makes later eager timings in that process faster: never export inside a timing process.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from openalign.errors import OpenAlignError
from openalign.inference.optimize import optimize_for_inference

DEFAULT_OPSET = 17
VISION_FILE, TEXT_FILE, MANIFEST_FILE, EXAMPLE_FILE = "vision.onnx", "text.onnx", "export.json", "example.py"
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")

# What example.py holds: the exported model used with nothing of openalign or PyTorch.
EXAMPLE = '''"""python example.py photo.jpg "a cat" "a dog": the cosine similarity of a photo and captions, with the
exported graphs alone (pip install onnxruntime tokenizers pillow numpy)."""
import json, sys
from pathlib import Path

import numpy as np, onnxruntime
from PIL import Image
from tokenizers import Tokenizer

here = Path(__file__).parent
settings = json.loads((here / "preprocessor_config.json").read_text())  # resize, then centre crop, then rescale
size, crop = settings["size"]["height"], settings["crop_size"]["height"]
image = Image.open(sys.argv[1]).convert("RGB").resize((size, size), Image.Resampling(settings["resample"]))
top = (size - crop) // 2
pixels = np.asarray(image, np.float32)[top : top + crop, top : top + crop] * settings["rescale_factor"]
pixels -= 1.0 if settings["rescale_offset"] else 0.0  # ALIGN's pixels are in [-1, 1]
pixel_values = np.ascontiguousarray(pixels.transpose(2, 0, 1)[None])  # (1, 3, H, W)
image_embeds = onnxruntime.InferenceSession(str(here / "vision.onnx")).run(None, {"pixel_values": pixel_values})[0]

tokenizer = Tokenizer.from_file(str(here / "tokenizer.json"))
max_length = json.loads((here / "tokenizer_config.json").read_text())["model_max_length"]
tokenizer.enable_truncation(min(max_length, 64))
tokenizer.enable_padding(pad_id=tokenizer.token_to_id("[PAD]"))
encodings = tokenizer.encode_batch(sys.argv[2:])
inputs = {name: np.array([getattr(e, key) for e in encodings], np.int64)
          for name, key in (("input_ids", "ids"), ("attention_mask", "attention_mask"), ("token_type_ids", "type_ids"))}
text_embeds = onnxruntime.InferenceSession(str(here / "text.onnx")).run(None, inputs)[0]

normalise = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
for text, similarity in zip(sys.argv[2:], (normalise(image_embeds) @ normalise(text_embeds).T)[0]):
    print(f"{similarity:.4f}  {text}")
'''


def _example_text(config, batch: int, length: int, seed: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, config.text_config.vocab_size, (batch, length), generator=generator)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[0, length // 2 :] = 0  # one padded row, so the mask path is in the graph and in the check
    token_type_ids = torch.zeros(batch, length, dtype=torch.long)
    return input_ids, attention_mask, token_type_ids


def _example_pixels(config, batch: int, seed: int) -> torch.Tensor:
    size = config.vision_config.image_size
    return torch.randn(batch, config.vision_config.num_channels, size, size,
                       generator=torch.Generator().manual_seed(seed))


def export_onnx(model, out_dir: str | Path, opset: int = DEFAULT_OPSET, check: bool = True, processor=None) -> dict:
    """Export both towers of an AlignModel to out_dir (see the module docstring); returns the manifest.
    With `processor` (the model's AlignProcessor), its tokenizer and image settings and example.py go beside the
    graphs, so the folder embeds photos and captions by itself.

    With check, each graph is run by onnxruntime on inputs of another batch size (and sequence length) than
    the export example and compared with the PyTorch inference copy; the maximum absolute and relative
    differences are stored in the manifest (`check_onnx` raises when they exceed 1e-4 relative).
    """
    try:
        import onnx  # noqa: F401 (torch's exporter writes the graphs through it)
    except ImportError:
        raise ExportError("ONNX export needs the onnx package: pip install 'openalign[onnx]'") from None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    optimized = optimize_for_inference(model, channels_last=False, device="cpu")
    config = optimized.config
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo, which needs onnxscript.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            optimized.vision, (_example_pixels(config, 2, 0),), str(out_dir / VISION_FILE), dynamo=False,
            input_names=["pixel_values"], output_names=["image_embeds"], opset_version=opset,
            dynamic_axes={"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}},
        )
        sequence_axes = {0: "batch", 1: "sequence"}
        torch.onnx.export(
            optimized.text, _example_text(config, 2, 8, 0), str(out_dir / TEXT_FILE), dynamo=False,
            input_names=list(TEXT_INPUTS), output_names=["text_embeds"], opset_version=opset,
            dynamic_axes={**{name: sequence_axes for name in TEXT_INPUTS}, "text_embeds": {0: "batch"}},
        )
    manifest = {
        "opset": opset,
        "vision": {"file": VISION_FILE, "inputs": ["pixel_values"], "outputs": ["image_embeds"],
                   "image_size": config.vision_config.image_size},
        "text": {"file": TEXT_FILE, "inputs": list(TEXT_INPUTS), "outputs": ["text_embeds"]},
        "embedding_dim": config.projection_dim,
    }
    if processor is not None:
        processor.save_pretrained(out_dir)
        (out_dir / EXAMPLE_FILE).write_text(EXAMPLE, encoding="utf-8")
        manifest["processor"] = {"tokenizer": "tokenizer.json", "image_settings": "preprocessor_config.json",
                                 "max_length": processor.tokenizer.max_length, "example": EXAMPLE_FILE}
    if check:
        manifest["check"] = check_onnx(optimized, out_dir)
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def load_for_export(model: str | Path):
    """(AlignModel, its AlignProcessor or None) of a model folder or hub id: None when the folder holds no
    tokenizer files, whose graphs can still be exported alone."""
    from openalign.inference.encoders import TOKENIZER_FILES
    from openalign.models.align import AlignModel
    from openalign.pretrained import resolve_folder
    from openalign.processing.processor import AlignProcessor

    folder = resolve_folder(model)
    has_tokenizer = any((folder / name).is_file() for name in TOKENIZER_FILES)
    return AlignModel.from_pretrained(folder), AlignProcessor.from_pretrained(folder) if has_tokenizer else None


class ExportError(OpenAlignError, RuntimeError):
    """An export cannot run here: its runtime is not installed."""


def onnx_session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU InferenceSession with full graph optimisation."""
    try:
        import onnxruntime
    except ImportError:
        raise ExportError("checking the ONNX graphs needs onnxruntime: pip install 'openalign[onnx]' "
                          "(or export with --no-check)") from None

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _compare(reference: torch.Tensor, result) -> dict:
    result = torch.as_tensor(result)
    difference = float((result - reference).abs().max())
    return {"max_abs": difference, "max_relative": difference / max(float(reference.abs().max()), 1e-30)}


def check_onnx(model, out_dir: str | Path, tolerance: float = 1e-4) -> dict:
    """Run both exported graphs with onnxruntime (batch 3, sequence 11) and compare with `model` (an AlignModel
    or its inference copy). Raises ValueError naming the graph whose maximum difference exceeds `tolerance`
    relative to the largest reference value; returns the differences otherwise."""
    out_dir = Path(out_dir)
    config = model.config
    pixels = _example_pixels(config, 3, 1)
    text = _example_text(config, 3, 11, 1)
    vision_result = onnx_session(out_dir / VISION_FILE).run(None, {"pixel_values": pixels.numpy()})[0]
    text_result = onnx_session(out_dir / TEXT_FILE).run(
        None, {name: tensor.numpy() for name, tensor in zip(TEXT_INPUTS, text)}
    )[0]
    with torch.no_grad():
        image_reference = model.get_image_features(pixels).float()
        text_reference = model.get_text_features(*text).float()
    results = {"vision": _compare(image_reference, vision_result), "text": _compare(text_reference, text_result)}
    for name, result in results.items():
        if not result["max_relative"] <= tolerance:
            raise ValueError(
                f"{out_dir / (VISION_FILE if name == 'vision' else TEXT_FILE)} differs from PyTorch by "
                f"{result['max_relative']:.2e} relative (tolerance {tolerance:.0e})"
            )
    return results
