"""Caption text for the synthetic dataset: templates and synonyms for clean captions, and the kinds of noise
real alt-text carries (boilerplate, junk tokens, too-short and too-long texts).

Every clean caption names the colour and the shape of the object (through a synonym at most), so a model can
learn both from the text. The canonical word is drawn most often, because evaluation prompts use it
("a red circle")."""

from __future__ import annotations

import itertools
import random

# Canonical word first; it is drawn with probability CANONICAL_WEIGHT, the synonyms share the rest.
COLOUR_WORDS = {
    "red": ["red", "crimson", "scarlet"],
    "green": ["green", "emerald", "grass-green"],
    "blue": ["blue", "azure", "cobalt"],
    "yellow": ["yellow", "golden", "lemon"],
    "purple": ["purple", "violet", "plum"],
    "orange": ["orange", "tangerine", "amber"],
    "pink": ["pink", "rose", "magenta"],
    "brown": ["brown", "chocolate", "chestnut"],
}

# (singular, plural) per synonym.
SHAPE_WORDS = {
    "circle": [("circle", "circles"), ("disc", "discs"), ("round shape", "round shapes")],
    "square": [("square", "squares"), ("box", "boxes"), ("four-sided block", "four-sided blocks")],
    "triangle": [("triangle", "triangles"), ("three-sided shape", "three-sided shapes")],
    "star": [("star", "stars"), ("five-pointed star", "five-pointed stars")],
    "cross": [("cross", "crosses"), ("plus sign", "plus signs")],
    "hexagon": [("hexagon", "hexagons"), ("six-sided shape", "six-sided shapes")],
}

CANONICAL_WEIGHT = 0.6
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
SIZE_WORDS = {"small": ["small", "little", "tiny"], "medium": ["medium", "mid-sized"],
              "large": ["large", "big"]}
BACKGROUND_WORDS = {"light": ["light grey", "white", "pale"], "mid": ["grey", "gray"],
                    "dark": ["dark", "black"]}
POSITION_WORDS = {
    "center": "in the center", "left": "on the left", "right": "on the right",
    "top": "at the top", "bottom": "at the bottom",
}

# {a} is the article fitted to the next word, {colour}/{shape} singular, {shapes} plural, {count} a number
# word. Single-object templates; each is 3 to 20 words long once filled.
SINGLE_TEMPLATES = [
    "{a} {colour} {shape}",
    "a photo of {a} {colour} {shape}",
    "an image of {a} {colour} {shape}",
    "a picture of {a} {colour} {shape} on a {background} background",
    "{a} {size} {colour} {shape}",
    "{a} {size} {colour} {shape} {position}",
    "a drawing of {a} {colour} {shape} {position}",
    "there is {a} {colour} {shape} on a {background} background",
    "{a} {colour} {shape} drawn on a {background} background",
    "close-up of {a} {colour} {shape}",
    "a simple {colour} {shape} icon",
    "a {shape} painted {colour}",
    "illustration of {a} {size} {colour} {shape}",
]
MULTI_TEMPLATES = [
    "{count} {colour} {shapes}",
    "{count} {size} {colour} {shapes}",
    "a photo of {count} {colour} {shapes}",
    "{count} {colour} {shapes} on a {background} background",
    "a group of {count} {colour} {shapes}",
]

# A small pool, so that each string is shared by many images (as the paper's caption-sharing rule expects).
BOILERPLATE = [
    "click to enlarge", "IMG_0423.jpg", "1920x1080", "image not found", "view larger image",
    "stock photo royalty free", "DSC_1187.JPG", "no description available",
]

# Words that are common in real alt-text; long captions pad with them, so that only the length rule
# (not the rare-token rule) catches a long caption.
FILLER_WORDS = (
    "best quality free shipping buy now online shop new high resolution wallpaper download hd "
    "cheap sale discount premium design art vector graphic background template modern style"
).split()

JUNK_ALPHABET = "bcdfghjklmnpqrstvwxz0123456789"


def article_for(word: str) -> str:
    """'an' before a vowel sound (approximated by the first letter), 'a' otherwise."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def fill_template(template: str, **fields: str) -> str:
    """`template` filled with `fields`, its "{a}" the article that agrees with the filled word after it."""
    following = template.split("{a} ", 1)[1].split()[0].format(**fields) if "{a} " in template else ""
    return template.format(a=article_for(following), **fields)


def pick_synonym(rng: random.Random, words: list):
    """The canonical (first) word with probability CANONICAL_WEIGHT, otherwise one of the others."""
    if len(words) == 1 or rng.random() < CANONICAL_WEIGHT:
        return words[0]
    return rng.choice(words[1:])


def _caption_fields(rng: random.Random, colour: str, shape: str, count: int, size: str, position: str,
                    background: str) -> dict[str, str]:
    """The words a template is filled with; synonyms drawn in a fixed order, so captions stay reproducible."""
    colour_word = pick_synonym(rng, COLOUR_WORDS[colour])
    singular, plural = pick_synonym(rng, SHAPE_WORDS[shape])
    return {
        "colour": colour_word, "shape": singular, "shapes": plural,
        "count": COUNT_WORDS.get(count, str(count)), "size": rng.choice(SIZE_WORDS[size]),
        "position": POSITION_WORDS[position], "background": rng.choice(BACKGROUND_WORDS[background]),
    }


def clean_caption(rng: random.Random, colour: str, shape: str, count: int, size: str, position: str | None,
                  background: str) -> str:
    """A caption that names the colour and shape of the image's objects (and sometimes count, size,
    position or background). `clean_caption_distribution` gives the probability of every string it returns."""
    fields = _caption_fields(rng, colour, shape, count, size, position, background)
    return fill_template(rng.choice(MULTI_TEMPLATES if count > 1 else SINGLE_TEMPLATES), **fields)


def _synonym_probabilities(words: list) -> list[tuple]:
    """(word, probability) for each word as `pick_synonym` draws them."""
    if len(words) == 1:
        return [(words[0], 1.0)]
    other = (1.0 - CANONICAL_WEIGHT) / (len(words) - 1)
    return [(words[0], CANONICAL_WEIGHT)] + [(word, other) for word in words[1:]]


def clean_caption_distribution(colour: str, shape: str, count: int, size: str, position: str | None,
                               background: str) -> dict[str, float]:
    """Every string `clean_caption` can return for an image with these attributes, with its probability
    (summing to 1). Different draws can give the same string (a template without the size word does not care
    which size word was drawn); their probabilities add up. This is the generator's own caption model, so it
    tells how well any model could match captions to images (`openalign.demo.evaluate.bayes_retrieval`)."""
    templates = MULTI_TEMPLATES if count > 1 else SINGLE_TEMPLATES
    sizes, backgrounds = SIZE_WORDS[size], BACKGROUND_WORDS[background]
    words = {"count": COUNT_WORDS.get(count, str(count)),  # no multi-object template names a position
             "position": POSITION_WORDS[position] if count == 1 else ""}
    distribution: dict[str, float] = {}
    for (colour_word, p_colour), ((singular, plural), p_shape) in itertools.product(
            _synonym_probabilities(COLOUR_WORDS[colour]), _synonym_probabilities(SHAPE_WORDS[shape])):
        for size_word, background_word, template in itertools.product(sizes, backgrounds, templates):
            caption = fill_template(template, colour=colour_word, shape=singular, shapes=plural, size=size_word,
                                    background=background_word, **words)
            probability = p_colour * p_shape / (len(sizes) * len(backgrounds) * len(templates))
            distribution[caption] = distribution.get(caption, 0.0) + probability
    return distribution


# Alt-text often names only part of what it shows. Colour-only templates say "object" or "thing", never a shape.
COLOUR_ONLY_SINGLE = [
    "{a} {colour} object", "a photo of {a} {colour} object", "something {colour} on a {background} background",
    "{a} {size} {colour} thing {position}", "an image of a {colour} item",
]
COLOUR_ONLY_MULTI = ["{count} {colour} objects", "a photo of {count} {colour} things"]


def partial_caption(rng: random.Random, colour: str, shape: str, count: int, size: str, position: str,
                    background: str, keep: str) -> str:
    """A caption naming only the shape (keep="shape": a clean template with its colour word taken out) or only
    the colour (keep="colour"); like clean captions, 3 to 20 words long."""
    fields = _caption_fields(rng, colour, shape, count, size, position, background)
    if keep == "shape":
        templates = [t.replace("{colour} ", "") for t in (MULTI_TEMPLATES if count > 1 else SINGLE_TEMPLATES)
                     if "{colour} {shape" in t]
    elif keep == "colour":
        templates = COLOUR_ONLY_MULTI if count > 1 else COLOUR_ONLY_SINGLE
    else:
        raise ValueError(f"keep must be 'shape' or 'colour', got {keep!r}")
    caption = fill_template(rng.choice(templates), **fields)
    if len(caption.split()) < 3:  # "a circle": pad as alt-text would, above the paper's 3-word minimum
        caption = f"a picture of {caption}"
    return caption


# Grey objects on a background of a named colour: the caption names the shape and the background's colour.
BACKGROUND_COLOUR_SINGLE = [
    "{a} {shape} on {a_colour} {colour} background", "a grey {shape} on {a_colour} {colour} background",
    "{a} {size} {shape} against {a_colour} {colour} background", "a {colour} background with {a} {shape} {position}",
    "a picture of {a} {shape} on {a_colour} {colour} background",
]
BACKGROUND_COLOUR_MULTI = [
    "{count} {shapes} on {a_colour} {colour} background", "{count} grey {shapes} on {a_colour} {colour} background",
    "a {colour} background with {count} {shapes}",
]


def background_colour_caption(rng: random.Random, background_colour: str, shape: str, count: int, size: str,
                              position: str) -> str:
    """A caption for grey objects on a coloured background: the shape and the background's colour word."""
    fields = _caption_fields(rng, background_colour, shape, count, size, position, "mid")
    template = rng.choice(BACKGROUND_COLOUR_MULTI if count > 1 else BACKGROUND_COLOUR_SINGLE)
    return fill_template(template, a_colour=article_for(fields["colour"]), **fields)


def boilerplate_caption(rng: random.Random) -> str:
    """One of a small pool of strings that many images share."""
    return rng.choice(BOILERPLATE)


def junk_caption(rng: random.Random) -> str:
    """Random letter-digit tokens (camera names, hashes, SEO spam): each token is rare in the corpus."""
    number_of_tokens = rng.randint(3, 8)
    return " ".join(
        "".join(rng.choice(JUNK_ALPHABET) for _ in range(rng.randint(4, 9))) for _ in range(number_of_tokens)
    )


def short_caption(rng: random.Random, colour: str, shape: str) -> str:
    """One or two words: under the paper's 3-unigram minimum."""
    options = [colour, shape, f"{colour} {shape}", "image", "photo", "untitled picture"]
    return rng.choice(options)


def long_caption(rng: random.Random, base_caption: str) -> str:
    """A clean caption padded with common filler words to 21-40 words: over the paper's 20-unigram
    maximum, yet made only of frequent tokens."""
    words = base_caption.split()
    target = rng.randint(21, 40)
    while len(words) < target:
        words.append(rng.choice(FILLER_WORDS))
    return " ".join(words)
