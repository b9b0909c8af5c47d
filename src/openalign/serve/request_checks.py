"""What a request to `openalign serve` may send, checked before any work: the JSON body, its fields, base64
images and embeddings. Every refusal is a `RequestError` naming the field, answered with its status.

The body is JSON from anyone: nesting is bounded (untrusted.parse_json), numbers must be ones a search can use
(no NaN or Infinity, which Python's json accepts; no integer of hundreds of digits; no float that overflows),
and strings must be Unicode (a JSON escape can make a lone surrogate, which no encoder takes).
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from openalign.errors import InputLimitError, OpenAlignError
from openalign.untrusted import parse_json

MAX_INTEGER_DIGITS = 20  # any count or id fits; a longer number is an attack or a mistake


class RequestError(OpenAlignError, ValueError):
    """A request the server refuses; status is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _refuse_constant(name: str):
    raise RequestError(f"{name} is not a JSON number")


def _bounded_integer(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INTEGER_DIGITS:
        raise RequestError(f"a number of {len(text.lstrip('-'))} digits (at most {MAX_INTEGER_DIGITS})")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise RequestError(f"{text:.40} is too large for a number")
    return value


def _strings(value: Any) -> Iterator[str]:
    """Every string of parsed JSON, keys included, walked without recursion."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def parse_body(data: bytes) -> Any:
    """The request body as JSON, or a RequestError saying what is wrong with it."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RequestError(f"the request body is not UTF-8 text (byte {error.start})") from None
    try:
        value = parse_json(text, "the request body", parse_constant=_refuse_constant, parse_int=_bounded_integer,
                           parse_float=_finite_float)
    except InputLimitError as error:
        raise RequestError(str(error)) from None
    except RequestError as error:
        raise RequestError(f"the request body holds {error}") from None
    except ValueError as error:
        raise RequestError(f"the request body is not valid JSON ({error})") from None
    for string in _strings(value):
        try:
            string.encode("utf-8")
        except UnicodeEncodeError as error:
            code = ord(string[error.start])
            raise RequestError(f"the request body holds a lone surrogate (\\u{code:04x}), which is not Unicode "
                               "text") from None
    return value


def field(body: Mapping, name: str, kind: type, default):
    """body[name] when it is of kind (default when absent or null); a RequestError naming the field otherwise."""
    value = body.get(name, default)
    if value is None:
        return default
    # bool is an int to Python; a JSON true is not a count of images.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RequestError(f"{name} must be {kind.__name__ if kind is not str else 'a string'}, not {value!r:.80}")
    return value


def bounded_count(body: Mapping, name: str, default: int, most: int) -> int:
    """An integer field between 1 and most."""
    value = field(body, name, int, default)
    if not 1 <= value <= most:
        raise RequestError(f"{name} must be between 1 and {most}, not {value}")
    return value


def decode_base64(text: str, max_bytes: int) -> bytes:
    """The bytes of a base64 image (or a data: URL as browsers write them) of at most max_bytes."""
    if text.startswith("data:") and "," in text[:100]:
        text = text.split(",", 1)[1]
    if len(text) > 4 * math.ceil(max_bytes / 3) + 4:
        raise RequestError(f"image is larger than {max_bytes} bytes", status=413)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise RequestError(f"image is not valid base64 ({error})") from error


def unit_embedding(values, dim: int) -> np.ndarray:
    """embedding_input as a (dim,) float32 unit vector: any finite scale gives the same direction.

    Normalised in float64, as the float32 norm of a legitimate direction overflows (values near 1e20) or
    underflows (near 1e-25) and would search along nothing; values no float32 holds and all zeros are refused.
    """
    if not isinstance(values, list) or len(values) != dim:
        raise RequestError(f"embedding_input must be a list of {dim} numbers")
    if not all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in values):
        raise RequestError("embedding_input must hold numbers only")
    with np.errstate(over="ignore"):
        vector = np.asarray([float(value) for value in values], dtype=np.float32)
    outside = np.flatnonzero(~np.isfinite(vector))
    if len(outside):
        raise RequestError(f"embedding_input[{outside[0]}] = {values[outside[0]]!r:.30} is beyond a 32-bit float "
                           "(about 3.4e38)")
    wide = vector.astype(np.float64)
    norm = float(np.linalg.norm(wide))
    if norm == 0:
        raise RequestError("embedding_input is all zeros: a vector of zeros has no direction to search along")
    return (wide / norm).astype(np.float32)
