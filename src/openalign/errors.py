"""Error types. Each names the offending file, key or value in its message."""


class OpenAlignError(Exception):
    """Base class of every error openalign raises on purpose."""


class ConfigError(OpenAlignError, ValueError):
    """A configuration field holds an invalid value."""


class CheckpointError(OpenAlignError):
    """A checkpoint file or folder cannot be read, or its keys do not fit the model."""


class ImageLoadError(OpenAlignError, ValueError):
    """An image cannot be opened or decoded; the message names its source."""


class InputLimitError(OpenAlignError, ValueError):
    """Untrusted bytes break a bound: too large, nested too deep, not a regular file, or a name leading out of its
    folder. The message names the file or member, and the bound."""


class TextInputError(OpenAlignError, ValueError):
    """A text to tokenize is not a string, or holds what cannot be encoded (a lone surrogate); names the item."""
