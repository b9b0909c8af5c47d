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


def nearest_names(typed: str, known, limit: int = 3) -> list[str]:
    """The names of `known` a user most likely meant by `typed`, best first, for "did you mean" messages.

    Dashes, underscores and case do not count ("--run.out-dir" and "run.outdir" are run.out_dir), a name's last
    part may be given alone or by its initials ("--lr", "--optim.learning_rate": optim.lr; those alone are
    given when there are such), and otherwise the closest spellings (difflib) win; a dotted section the user
    typed is preferred."""
    import difflib

    def words(name: str) -> str:
        return name.lstrip("-").replace("-", "_").lower()

    def normal(name: str) -> str:
        return words(name).replace("_", "")

    by_normal: dict[str, str] = {}
    for name in known:
        by_normal.setdefault(normal(name), name)
    wanted = normal(typed)
    if wanted in by_normal:
        return [by_normal[wanted]]
    section, _, last = wanted.rpartition(".")
    initials = "".join(word[0] for word in words(typed).rpartition(".")[2].split("_") if word)
    same_last = [key for key in by_normal if key.rpartition(".")[2] in (last, initials)]
    same_last.sort(key=lambda key: key.rpartition(".")[0] != section)  # the typed section first
    nearest = same_last or difflib.get_close_matches(wanted, list(by_normal), n=limit, cutoff=0.6)
    return [by_normal[key] for key in nearest[:limit]]


def did_you_mean(typed: str, known) -> str:
    """" (did you mean X or Y?)" for the names of `known` nearest to `typed`, or "" when none is near."""
    names = nearest_names(typed, known)
    return f" (did you mean {' or '.join(names)}?)" if names else ""
