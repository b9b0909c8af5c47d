"""From files and arrays to model inputs: image loading, image transforms, tokenizer, processor."""

from openalign.processing.image_processor import AlignImageProcessor
from openalign.processing.images import load_image, load_images, train_transform
from openalign.processing.processor import AlignProcessor, BatchEncoding
from openalign.processing.tokenizer import AlignTokenizer, train_wordpiece

__all__ = [
    "AlignImageProcessor",
    "AlignProcessor",
    "AlignTokenizer",
    "BatchEncoding",
    "load_image",
    "load_images",
    "train_transform",
    "train_wordpiece",
]
