"""Prompt templates for zero-shot classification.

Built-in sets: "imagenet80", the 80 ImageNet prompt templates published with CLIP (Radford et al. 2021,
notebooks/Prompt_Engineering_for_ImageNet.ipynb in openai/CLIP), and "photo", the single "a photo of a {}.".
Custom sets are text files with one template per line, each holding the placeholder {} exactly once.
"""

from __future__ import annotations

from pathlib import Path

from openalign.errors import OpenAlignError


class TemplateError(OpenAlignError, ValueError):
    """A prompt template set cannot be found or a template lacks its single {} placeholder."""


IMAGENET_TEMPLATES = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

PHOTO_TEMPLATES = ("a photo of a {}.",)

BUILTIN_TEMPLATE_SETS = {"imagenet80": IMAGENET_TEMPLATES, "photo": PHOTO_TEMPLATES}


def check_templates(templates, source: str = "templates") -> tuple[str, ...]:
    """The templates as a tuple, each checked to hold {} exactly once; source names them in errors."""
    templates = tuple(templates)
    if not templates:
        raise TemplateError(f"{source} holds no template")
    for line_number, template in enumerate(templates, start=1):
        # Other braces would make str.format fail or swallow the label.
        if not (template.count("{}") == template.count("{") == template.count("}") == 1):
            raise TemplateError(
                f"{source}, template {line_number} {template!r}: needs exactly one {{}} placeholder"
            )
    return templates


def load_templates(name_or_path: str | Path) -> tuple[str, ...]:
    """A built-in set by name ("imagenet80", "photo") or a text file with one template per line.

    Blank lines and lines starting with # are ignored in files.
    """
    if str(name_or_path) in BUILTIN_TEMPLATE_SETS:
        return BUILTIN_TEMPLATE_SETS[str(name_or_path)]
    path = Path(name_or_path)
    if not path.is_file():
        raise TemplateError(
            f"template set {str(name_or_path)!r} is neither a built-in set "
            f"({', '.join(sorted(BUILTIN_TEMPLATE_SETS))}) nor a file"
        )
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return check_templates([line for line in lines if line and not line.startswith("#")], source=str(path))
