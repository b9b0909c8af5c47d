"""`openalign search INDEX "a red bicycle" [--image query.jpg] [-k 10] [--json] [--html out.html]`: the command
line of `openalign.index.faiss_index.search_index`."""

from __future__ import annotations

import argparse
from pathlib import Path

from openalign.cli._common import add_model_arguments, encoders_from_arguments, print_json
from openalign.cli._help import add_command


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `search` command."""
    parser = add_command(
        subparsers, "search", help="search an index by text and/or image queries",
        description="Search an index from `openalign index` by text and/or image queries, with the model the "
                    "embeddings were made with (the index's model.json) unless --model says otherwise. Scores are "
                    "cosine similarities.",
        examples=('openalign search embeddings/index "a red bicycle" -k 5',
                  "openalign search embeddings/index --image query.jpg --html results.html",
                  'openalign search embeddings/index "a dog" "a cat" --json'))
    parser.add_argument("index", help="index folder written by `openalign index`")
    parser.add_argument("texts", nargs="*", help="text queries")
    parser.add_argument("--image", action="append", default=[], dest="images", help="an image query; repeat")
    parser.add_argument("-k", type=int, default=10, help="hits per query")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--html", help="also write a page of the results (query, thumbnails, captions) here")
    parser.add_argument("--any-model", action="store_true",
                        help="search even when --model is not the model the index's model.json records")
    add_model_arguments(parser, required=False)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Encode the queries with the index's checkpoint (or --model), search, print."""
    from openalign.index.faiss_index import IndexBuildError, search_index
    from openalign.index.html import write_results_html
    from openalign.inference.embedding_folder import MODEL_FILE, read_model_reference

    if not args.texts and not args.images:
        raise SystemExit("openalign search: give a text query, --image, or both")
    if not Path(args.index).is_dir():
        raise IndexBuildError(f"no index folder at {args.index} (build one with `openalign index EMBED_DIR`)")
    if args.model is None:
        args.model = read_model_reference(args.index)
        if args.model is None:
            raise SystemExit(f"openalign search: {Path(args.index) / MODEL_FILE} does not exist; pass the model the "
                             "embeddings were made with as --model (-m)")
    results = search_index(args.index, encoders_from_arguments(args), args.texts, args.images, args.k,
                           any_model=args.any_model)
    if args.html:
        write_results_html(results, args.html)
    if args.json:
        print_json(results)
        return 0
    for result in results:
        print(f"{result['kind']} query: {result['query']}")
        for rank, hit in enumerate(result["hits"], start=1):
            caption = f"  {hit['caption']}" if hit.get("caption") else ""
            print(f"  {rank:>3}. {hit['score']:.4f}  {hit['source']}{caption}")
    print("(rank. cosine similarity  source  caption)")
    if args.html:
        print(f"wrote {args.html}")
    return 0
