"""A self-contained HTML page of search results: thumbnails inlined as base64 JPEG, so the file can be moved.

Each query gets a section headed by the query itself (its text, or its image's thumbnail), then its hits in
rank order: rank, thumbnail, caption from the index's metadata, cosine similarity (labelled, with a bar) and
source file.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path

_STYLE = """
body { font-family: sans-serif; margin: 1em; color: #222; }
.query { display: flex; align-items: center; gap: 12px; }
.query img { max-height: %(size)dpx; border: 2px solid #444; }
.hits { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; width: %(size)dpx; font-size: 12px; }
figure img { max-width: %(size)dpx; max-height: %(size)dpx; display: block; }
.rank { font-weight: bold; }
.caption { margin: 2px 0; }
.score { color: #333; }
.bar { height: 4px; background: #4a7bd0; margin: 2px 0; }
.source { color: #777; word-break: break-all; }
.missing { width: %(size)dpx; height: %(size)dpx; background: #ddd; display: flex; align-items: center;
           justify-content: center; color: #555; }
"""


def thumbnail_data_uri(source, size: int = 160) -> str | None:
    """A data: URI holding a JPEG thumbnail of the image at source, or None when it cannot be read.

    The image goes through processing.images.load_image, the one guarded door: a decompression bomb, a FIFO or
    a device is refused there, and shows as a grey box like a missing or undecodable file.
    """
    from openalign.errors import ImageLoadError
    from openalign.processing.images import load_image

    try:
        image = load_image(source)
        image.thumbnail((size, size))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
    except (ImageLoadError, OSError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure(rank: int, hit: dict, size: int) -> str:
    source = hit.get("source")
    uri = thumbnail_data_uri(source, size) if source else None
    caption = str(hit.get("caption") or "")
    picture = (f'<img src="{uri}" alt="{html.escape(caption or str(source))}">' if uri
               else f'<div class="missing">{html.escape(caption[:60] or "no image")}</div>')
    score = float(hit.get("score", float("nan")))
    width = max(0.0, min(1.0, score)) * 100  # cosine similarity; negative ones get no bar
    return (f'<figure>{picture}<figcaption><span class="rank">#{rank}</span> '
            f'<span class="score">cosine similarity {score:.3f}</span>'
            f'<div class="bar" style="width: {width:.0f}%"></div>'
            + (f'<div class="caption">{html.escape(caption)}</div>' if caption else "")
            + f'<div class="source">{html.escape(str(source or ""))}</div></figcaption></figure>')


def _query_heading(result: dict, size: int) -> str:
    if result.get("kind") == "image":
        uri = thumbnail_data_uri(result["query"], size)
        picture = f'<img src="{uri}" alt="the query image">' if uri else ""
        return f'<div class="query"><h2>image query: {html.escape(str(result["query"]))}</h2>{picture}</div>'
    return f'<div class="query"><h2>text query: {html.escape(str(result["query"]))}</h2></div>'


def write_results_html(results: Sequence[dict], path: str | Path, *, thumbnail_size: int = 160,
                       title: str = "openalign search results") -> Path:
    """Write one section per query to path: `results` as `openalign.index.faiss_index.search_index` returns
    them, {"query", "kind" ("text" or "image"), "hits"}, the hits metadata dicts with "source", "caption" and
    "score", best first."""
    sections = []
    for result in results:
        figures = "\n".join(_figure(rank, hit, thumbnail_size) for rank, hit in enumerate(result["hits"], start=1))
        sections.append(f'{_query_heading(result, thumbnail_size)}\n<div class="hits">\n{figures}\n</div>')
    page = (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_STYLE % {'size': thumbnail_size}}</style></head>\n<body>\n<h1>{html.escape(title)}</h1>\n"
        "<p>Hits in rank order; the score is the cosine similarity of the query's and the hit's embeddings "
        "(1 is the same direction).</p>\n"
        + "\n".join(sections)
        + "\n</body></html>\n"
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
