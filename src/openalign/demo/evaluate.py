"""Held-out figures of the demo: retrieval with its ceilings, zero-shot colour / shape / pair accuracy, chance.

The held-out split holds colour-shape pairs never seen in training, so every figure here measures composition:
the model knows each colour and each shape, but never saw them together.

Zero-shot prompts are ensembles built from the generator's own caption templates (the ones that name only
colour and shape), filled with the canonical words ("a photo of a red circle"). Colour and shape are read from
the pair classifier by marginalising its softmax (temperature: the model's) over the other attribute; the
shape-only classifier uses the same templates with the colour word taken out ("a photo of a circle").

Retrieval pairs each held-out image with its own caption, in galleries of GALLERY_SIZE pairs (consecutive
held-out rows, whose colour-shape pairs come in random order), averaged over galleries. Why galleries: a
caption names colour, shape, count and at most one of size, position or background, so in one gallery of all
2,000 held-out images a caption fits about a hundred images equally well and instance-level recall measures
luck; in 100 it fits a handful, as in Flickr30K-style benchmarks. The full-gallery figures are reported too
(keys `full_gallery_*`).

One tie rule for the model's figures and for both ceilings (`gallery_recalls`): image -> text counts a caption
identical to the image's own as the right answer (it is the same string), and any other candidates that score
exactly as the right one are put in random order, so a figure is the expected recall over that order
(`expected_recall`). Identical captions get bit-identical scores (each distinct string is embedded once, and its
column of cosines is reused), so image -> text can reach 1.0. Text -> image cannot: a caption shared by m images
of the gallery points at one of them, which no model can tell from the other m - 1, so its best expected R@k
is min(1, k / m); `recall_ceilings` is the mean of that over captions. Different captions can fit equally well
too ("a photo of a blue circle", "close-up of a blue circle"), which that ceiling does not see:
`bayes_retrieval` gives the best expected recall from the generator's own caption model and each image's true
attributes (`bayes_ceiling`), under the same rule, and every retrieval figure is also given as a fraction of it
(`*_of_best`).
"""

from __future__ import annotations

import functools
import json
import string
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from openalign.data import captions
from openalign.eval.zero_shot import ensemble_embeddings

RECALL_KS = (1, 5)
GALLERY_SIZE = 100


def read_rows(manifest: str | Path) -> list[dict]:
    """The rows of a JSON-lines manifest, in order."""
    return [json.loads(line) for line in Path(manifest).read_text().splitlines() if line.strip()]


def pair_templates() -> list[str]:
    """Single-object caption templates whose only fields are the article, colour and shape."""
    templates = []
    for template in captions.SINGLE_TEMPLATES:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name}
        if fields <= {"a", "colour", "shape"} and {"colour", "shape"} <= fields:
            templates.append(template)
    return templates


def shape_only_templates() -> list[str]:
    """The pair templates in which the colour word directly precedes the shape, with the colour removed."""
    return [template.replace("{colour} ", "") for template in pair_templates() if "{colour} {shape}" in template]


def fill(template: str, colour: str | None, shape: str) -> str:
    """A prompt from a template and canonical words, with the article agreeing with the word after it."""
    return " ".join(captions.fill_template(template, colour=colour or "", shape=shape).split())


def zero_shot_accuracies(image_embeds: torch.Tensor, rows: Sequence[dict], colours: Sequence[str],
                         shapes: Sequence[str], encode_texts, temperature: float,
                         train_pairs: Sequence[Sequence[str]] = ()) -> dict:
    """Colour, shape and pair accuracy from pair prompts, and shape accuracy from shape-only prompts; with
    `train_pairs`, also how often the predicted pair is one seen in training."""
    pairs = [(colour, shape) for colour in colours for shape in shapes]
    templates = pair_templates()
    pair_classes = ensemble_embeddings(encode_texts, [[fill(t, c, s) for t in templates] for c, s in pairs],
                                       classes_per_call=None)  # one call: the demo has few classes
    probabilities = (image_embeds @ pair_classes.T / temperature).softmax(dim=-1)  # (N, C * S)
    by_colour_shape = probabilities.reshape(len(image_embeds), len(colours), len(shapes))
    colour_predicted = by_colour_shape.sum(2).argmax(1).numpy()
    shape_predicted = by_colour_shape.sum(1).argmax(1).numpy()
    pair_predicted = probabilities.argmax(1).numpy()

    shape_classes = ensemble_embeddings(encode_texts, [[fill(t, None, s) for t in shape_only_templates()]
                                                       for s in shapes], classes_per_call=None)
    shape_only_predicted = (image_embeds @ shape_classes.T).argmax(1).numpy()

    colour_true = np.array([colours.index(row["colour"]) for row in rows])
    shape_true = np.array([shapes.index(row["shape"]) for row in rows])
    pair_true = colour_true * len(shapes) + shape_true
    seen = {tuple(pair) for pair in train_pairs}
    figures = {
        "colour_accuracy": float(np.mean(colour_predicted == colour_true)),
        "shape_accuracy": float(np.mean(shape_predicted == shape_true)),
        "shape_only_prompt_accuracy": float(np.mean(shape_only_predicted == shape_true)),
        "pair_accuracy": float(np.mean(pair_predicted == pair_true)),
    }
    if seen:  # the pull of familiar combinations on images of unfamiliar ones
        figures["predicted_pair_seen_in_training"] = float(np.mean([pairs[p] in seen for p in pair_predicted]))
    return figures


def recall_ceilings(texts: Sequence[str], ks: Sequence[int] = RECALL_KS) -> dict:
    """Best expected recall when each text belongs to one image and identical texts tie (module docstring)."""
    counts = Counter(texts)
    ceilings = {}
    for k in ks:
        ceilings[f"text_to_image_r{k}"] = float(np.mean([min(1.0, k / counts[text]) for text in texts]))
        ceilings[f"image_to_text_r{k}"] = 1.0
    return ceilings


def gallery_recalls(image_to_text: np.ndarray, text_to_image: np.ndarray, texts: Sequence[str]) -> dict:
    """R@k both ways (fractions) for a gallery whose image i has caption texts[i], from (image, text) scores of
    each direction, under the module's tie rule: the model's cosines for both, or the best possible ranking's
    posterior and likelihood (`bayes_retrieval`)."""
    own = np.arange(len(texts))
    ids = np.unique(np.asarray(texts, dtype=object), return_inverse=True)[1].reshape(-1)
    identical = ids[:, None] == ids[None, :]  # the same caption is the same answer
    figures = {}
    for k in RECALL_KS:
        figures[f"image_to_text_r{k}"] = expected_recall(image_to_text, own, k, exempt=identical)
        figures[f"text_to_image_r{k}"] = expected_recall(text_to_image.T, own, k)
    return figures


def retrieval_figures(image_embeds: torch.Tensor, texts: Sequence[str], encode_texts) -> dict:
    """Image->text and text->image R@1/R@5 (fractions) of each image against its own caption, under the tie
    rule of the best possible (module docstring)."""
    unique = sorted(set(texts))
    position = {text: index for index, text in enumerate(unique)}
    images = torch.nn.functional.normalize(image_embeds.float(), dim=-1)
    cosines = (images @ encode_texts(unique).float().T).double().numpy()  # (images, distinct captions)
    scores = cosines[:, [position[text] for text in texts]]  # identical strings, bit-identical columns
    return gallery_recalls(scores, scores, texts)


def gallery_bounds(count: int, gallery_size: int = GALLERY_SIZE) -> list[tuple[int, int]]:
    """(start, stop) of consecutive galleries of `gallery_size` rows; a last, smaller one joins the one before."""
    starts = list(range(0, count, gallery_size))
    if len(starts) > 1 and count - starts[-1] < gallery_size:
        starts.pop()
    return list(zip(starts, starts[1:] + [count]))


def gallery_retrieval(image_embeds: torch.Tensor, texts: Sequence[str], encode_texts,
                      gallery_size: int = GALLERY_SIZE) -> tuple[dict, dict]:
    """(recall, ceiling): retrieval figures and their ceilings averaged over consecutive galleries of
    `gallery_size` pairs (a last, smaller gallery is merged into the one before it)."""
    bounds = gallery_bounds(len(texts), gallery_size)
    recalls = [retrieval_figures(image_embeds[a:b], texts[a:b], encode_texts) for a, b in bounds]
    ceilings = [recall_ceilings(texts[a:b]) for a, b in bounds]
    weights = np.array([b - a for a, b in bounds], dtype=np.float64)

    def average(parts: list[dict]) -> dict:
        return {key: float(np.average([part[key] for part in parts], weights=weights)) for key in parts[0]}

    return average(recalls), average(ceilings)


def expected_recall(scores: np.ndarray, own: np.ndarray, k: int, exempt: np.ndarray | None = None) -> float:
    """Mean over queries (rows of `scores`, (Q, C)) of the probability that candidate `own[q]` is among the top
    k when candidates of equal score are put in random order. Candidates marked in `exempt` ((Q, C) bool,
    e.g. captions identical to the right one: the optimistic tie rule of openalign.eval.retrieval) never push
    it down."""
    rows = np.arange(len(scores))
    right = scores[rows, own][:, None]  # (Q, 1)
    rivals = np.ones(scores.shape, dtype=bool) if exempt is None else ~exempt
    rivals[rows, own] = False
    tolerance = 1e-9 * np.abs(right)  # equal probabilities summed in another order differ in the last bits
    better = ((scores > right + tolerance) & rivals).sum(1)
    equal = ((np.abs(scores - right) <= tolerance) & rivals).sum(1)
    return float(np.mean(np.clip((k - better) / (equal + 1), 0.0, 1.0)))


ATTRIBUTES = ("colour", "shape", "count", "size", "position", "background")
# The caption distribution of an attribute tuple, computed once for all galleries and splits (read, never changed).
_caption_model = functools.lru_cache(maxsize=4096)(captions.clean_caption_distribution)


def bayes_retrieval(rows: Sequence[dict], gallery_size: int = GALLERY_SIZE) -> dict | None:
    """The best expected retrieval figures any model can reach on these galleries: those of a model that sees
    every image's true attributes (colour, shape, count, size, position, background) and knows the generator's
    caption model (`captions.clean_caption_distribution`), ties among equally likely candidates broken at
    random. None unless every row carries those attributes and a clean caption drawn from them.

    Why the identical-caption ceiling (`recall_ceilings`) is not enough: captions say little ("a photo of a
    blue circle"), so in a gallery of held-out images (ten colour-shape pairs, ten images each) several
    different captions fit an image equally well, and several images fit a caption. Text -> image ranks images
    by the caption's likelihood under each image's attributes, the posterior of which image it came from.
    Image -> text ranks each caption by the posterior that this image is the one it came from: its likelihood
    under the image over the sum of its likelihoods under all the gallery's images (a specific caption that
    fits the image outranks a generic one that fits every image of the pair)."""
    if not rows or any(row.get("colour") is None or any(key not in row for key in ATTRIBUTES) for row in rows):
        return None
    texts = [row["caption"] for row in rows]
    sums: dict[str, float] = {}
    for start, stop in gallery_bounds(len(rows), gallery_size):
        models = [_caption_model(*(row[key] for key in ATTRIBUTES)) for row in rows[start:stop]]
        gallery = texts[start:stop]
        columns: dict[str, list[int]] = {}
        for index, text in enumerate(gallery):
            columns.setdefault(text, []).append(index)
        likelihood = np.zeros((len(gallery), len(gallery)))  # (image, text): P(text | image's attributes)
        for image, model in enumerate(models):
            for text, probability in model.items():
                likelihood[image, columns.get(text, [])] = probability
        own = np.arange(len(gallery))
        if not likelihood[own, own].all():  # a caption its own image's attributes could not have produced
            return None
        # Image -> text ranks captions by the posterior that they came from this image, text -> image images by
        # the caption's likelihood under each.
        figures = gallery_recalls(likelihood / likelihood.sum(0, keepdims=True), likelihood, gallery)
        for key, value in figures.items():
            sums[key] = sums.get(key, 0.0) + len(gallery) * value
    return {key: value / len(rows) for key, value in sums.items()}


def chance_levels(gallery: int, colours: Sequence[str], shapes: Sequence[str]) -> dict:
    """What a model guessing at random scores on each figure, retrieval in galleries of `gallery` pairs."""
    num_images = num_texts = gallery
    chance = {
        "colour_accuracy": 1 / len(colours), "shape_accuracy": 1 / len(shapes),
        "shape_only_prompt_accuracy": 1 / len(shapes), "pair_accuracy": 1 / (len(colours) * len(shapes)),
    }
    for k in RECALL_KS:
        chance[f"image_to_text_r{k}"] = min(1.0, k / num_texts)
        chance[f"text_to_image_r{k}"] = min(1.0, k / num_images)
    return chance


def encode_split(encoders, rows: Sequence[dict], split_dir: str | Path) -> torch.Tensor:
    """(N, D) embeddings of a split's images, in row order."""
    return encoders.encode_images([Path(split_dir) / row["image_path"] for row in rows])


def evaluate_split(encoders, rows: Sequence[dict], split_dir: str | Path, summary: dict,
                   image_embeds: torch.Tensor | None = None) -> dict:
    """Every figure of a split (held-out or seen pairs), its chance level and (retrieval) its ceiling, for a
    model behind `encoders` (an `openalign.inference.encoders.Encoders`); `summary` is the generator's
    dataset.json. `image_embeds` saves encoding the images again (see `encode_split`)."""
    colours, shapes = list(summary["colours"]), list(summary["shapes"])
    if image_embeds is None:
        image_embeds = encode_split(encoders, rows, split_dir)
    texts = [row["caption"] for row in rows]
    figures, ceilings = gallery_retrieval(image_embeds, texts, encoders.encode_texts)
    figures["retrieval_gallery_size"] = min(GALLERY_SIZE, len(rows))
    full = retrieval_figures(image_embeds, texts, encoders.encode_texts)
    figures.update({f"full_gallery_{key}": value for key, value in full.items()})
    figures.update(zero_shot_accuracies(image_embeds, rows, colours, shapes, encoders.encode_texts,
                                        encoders.temperature, summary.get("train_pairs", ())))
    figures["chance"] = chance_levels(figures["retrieval_gallery_size"], colours, shapes)
    figures["chance"].update({f"full_gallery_{key}": value for key, value in
                              chance_levels(len(rows), colours, shapes).items() if key in full})
    figures["ceiling"] = ceilings
    figures["ceiling"].update({f"full_gallery_{key}": value for key, value in recall_ceilings(texts).items()})
    bayes = bayes_retrieval(rows, GALLERY_SIZE)
    if bayes is not None:  # the best a model can expect on these galleries (see bayes_retrieval)
        full_bayes = bayes_retrieval(rows, len(rows))
        figures["bayes_ceiling"] = {**bayes, **{f"full_gallery_{key}": value for key, value in full_bayes.items()}}
        figures.update(fractions_of_best(figures, figures["bayes_ceiling"]))
    return figures


def fractions_of_best(figures: dict, best: dict) -> dict:
    """`{key}_of_best`: each retrieval figure as a fraction of its best possible (`bayes_retrieval`)."""
    return {f"{key}_of_best": figures[key] / value for key, value in best.items() if key in figures and value > 0}


def additive_prototypes(image_embeds: torch.Tensor, rows: Sequence[dict], colours: Sequence[str],
                        shapes: Sequence[str]) -> torch.Tensor:
    """(C * S, D): for every colour-shape pair, mean image of its colour + mean image of its shape - mean
    image, from normalised embeddings of images of seen pairs; pair (c, s) is row c * S + s. What the image
    embedding of an unseen pair would be if the image tower composed colour and shape additively."""
    embeds = torch.nn.functional.normalize(image_embeds.float(), dim=-1)
    colour_index = torch.tensor([colours.index(row["colour"]) for row in rows])
    shape_index = torch.tensor([shapes.index(row["shape"]) for row in rows])
    colour_means = torch.stack([embeds[colour_index == c].mean(0) for c in range(len(colours))])  # (C, D)
    shape_means = torch.stack([embeds[shape_index == s].mean(0) for s in range(len(shapes))])  # (S, D)
    prototypes = colour_means[:, None, :] + shape_means[None, :, :] - embeds.mean(0)  # (C, S, D)
    return torch.nn.functional.normalize(prototypes.reshape(len(colours) * len(shapes), -1), dim=-1)


def composition_figures(seen_embeds: torch.Tensor, seen_rows: Sequence[dict], held_embeds: torch.Tensor,
                        held_rows: Sequence[dict], summary: dict, encode_texts) -> dict:
    """Which tower fails to compose, from additive prototypes built on seen-pair images:

    - `image_shape_accuracy_heldout` / `_seen`: shape read from the nearest prototype, for held-out and for
      seen images. Near the seen figure, the image tower places an unseen pair where colour + shape predicts;
      far below it, the image of an unseen pair lands elsewhere (usually on a pair its colour was seen with).
    - `text_pairs_nearest_own_prototype`: the fraction of held-out pairs whose pair-prompt embedding is nearest
      to its own pair's prototype among all pairs: the text tower's composition of words never seen together.
    """
    colours, shapes = list(summary["colours"]), list(summary["shapes"])
    prototypes = additive_prototypes(seen_embeds, seen_rows, colours, shapes)

    def shape_accuracy(embeds: torch.Tensor, rows: Sequence[dict]) -> float:
        nearest = (torch.nn.functional.normalize(embeds.float(), dim=-1) @ prototypes.T).argmax(1)
        truth = torch.tensor([shapes.index(row["shape"]) for row in rows])
        return float((nearest % len(shapes) == truth).float().mean())

    held_pairs = [tuple(pair) for pair in summary["heldout_pairs"]]
    prompts = ensemble_embeddings(encode_texts, [[fill(t, c, s) for t in pair_templates()] for c, s in held_pairs],
                                  classes_per_call=None)
    own = [colours.index(c) * len(shapes) + shapes.index(s) for c, s in held_pairs]
    nearest = (prompts @ prototypes.T).argmax(1)
    return {
        "image_shape_accuracy_heldout": shape_accuracy(held_embeds, held_rows),
        "image_shape_accuracy_seen": shape_accuracy(seen_embeds, seen_rows),
        "text_pairs_nearest_own_prototype": float(np.mean([int(n) == o for n, o in zip(nearest, own)])),
    }
