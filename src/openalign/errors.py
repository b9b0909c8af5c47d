"""Error types. Each names the offending file, key or value in its message."""


class OpenAlignError(Exception):
    """Base class of every error openalign raises on purpose."""


class ConfigError(OpenAlignError, ValueError):
    """A configuration field holds an invalid value."""


class CheckpointError(OpenAlignError):
    """A checkpoint file or folder cannot be read, or its keys do not fit the model."""


class ImageLoadError(OpenAlignError, ValueError):
    """An image cannot be opened or decoded; the message names its source."""
