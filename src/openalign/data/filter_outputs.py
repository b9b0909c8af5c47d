"""A filter's output folder, shared by the rules (data/filters.py) and the similarity filter (curation/): the
kept pairs (`manifest.jsonl` or `shards/`), `dropped.jsonl` and the report, committed so that the folder never
mixes two runs.

One filter writes a folder at a time: `filter_outputs` holds the folder's lock (openalign.files.locked_folder),
so a second filter into it fails at once with one line. Before anything is replaced, the previous run's report
is removed; each output is then written under a temporary name and renamed into place, and `write_report`
writes the report last. A folder with a report therefore holds that report's outputs, whole; a filter killed
midway leaves no report (and the previous outputs, or this run's finished ones), and its rerun writes them all.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from openalign.data import sources
from openalign.data.records import Record
from openalign.errors import ConfigError
from openalign.files import atomic_write_bytes, locked_folder

REPORT_JSON, REPORT_TEXT, DROPPED = "report.json", "report.txt", "dropped.jsonl"


@contextlib.contextmanager
def filter_outputs(out_dir: str | os.PathLike) -> Iterator[Path]:
    """The output folder (created), locked for this process, with the previous run's report removed: the
    report that `write_report` writes at the end is the sign that the outputs beside it are whole."""
    with locked_folder(out_dir, "filter output folder") as out:
        for name in (REPORT_JSON, REPORT_TEXT):
            (out / name).unlink(missing_ok=True)
        yield out


def write_report(out: Path, report: dict, text: str) -> None:
    """report.txt, then report.json, each by rename: the last files a filter writes."""
    atomic_write_bytes(out / REPORT_TEXT, text.encode("utf-8"))
    atomic_write_bytes(out / REPORT_JSON, (json.dumps(report, indent=2) + "\n").encode("utf-8"))


def resolve_output(source, output: str) -> str:
    """What a filter writes its kept pairs as: "manifest" or "shards"; "auto" follows the source."""
    if output == "auto":
        output = "shards" if sources.is_shard_source(source) else "manifest"
    if output not in ("manifest", "shards"):
        raise ConfigError(f"output must be 'auto', 'manifest' or 'shards', got {output!r}")
    return output


def write_kept(records: Iterable[Record], out: Path, output: str) -> dict:
    """Write a filter's kept pairs into `out` as `manifest.jsonl` or WebDataset shards under `shards/`
    (`output` from `resolve_output`), streaming, each file by rename; returns {"manifest": path} or
    {"shards": [paths]}."""
    if output == "shards":
        for stale in (out / "shards").glob("filtered-*.tar"):  # an earlier run's, possibly more shards than now
            stale.unlink()
        return {"shards": [str(path) for path in sources.write_shards(records, out / "shards", prefix="filtered")]}
    return {"manifest": str(sources.write_manifest(records, out / "manifest.jsonl"))}
