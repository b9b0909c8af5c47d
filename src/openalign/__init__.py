"""openalign: the ALIGN dual encoder (EfficientNet image tower + BERT text tower) in PyTorch."""

from __future__ import annotations

from openalign.lazy_exports import lazy_getattr

__version__ = "0.1.0"

# Public names and the module that defines each; imported on first use so `import openalign` stays cheap.
_EXPORTS = {
    "AlignConfig": "openalign.model_config",
    "AlignTextConfig": "openalign.model_config",
    "AlignVisionConfig": "openalign.model_config",
    "get_preset": "openalign.model_config",
    "AlignModel": "openalign.models.align",
    "AlignTextModel": "openalign.models.bert",
    "AlignVisionModel": "openalign.models.efficientnet",
    "AlignProcessor": "openalign.processing.processor",
    "AlignTokenizer": "openalign.processing.tokenizer",
    "AlignImageProcessor": "openalign.processing.image_processor",
    "load_image": "openalign.processing.images",
    "AlignLoss": "openalign.losses",
    "ClipLoss": "openalign.losses",
    "SigLipLoss": "openalign.losses",
    "Encoders": "openalign.inference.encoders",
    "load_encoders": "openalign.inference.encoders",
    "embed_to_folder": "openalign.inference.embed",
    "Index": "openalign.index.faiss_index",
    "build_index": "openalign.index.faiss_index",
    "retrieval_metrics": "openalign.eval.retrieval",
    "TrainConfig": "openalign.train.config",
    "load_config": "openalign.train.config",
    "CheckpointError": "openalign.errors",
    "ConfigError": "openalign.errors",
    "ImageLoadError": "openalign.errors",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
