"""`openalign embed SOURCE... --model CKPT --out DIR [--kind image|text|both]`: embeddings at scale.

Sources: image folders (recursive; a sidecar <stem>.txt is the caption), manifests (.csv/.tsv/.jsonl/.parquet),
WebDataset shards (tar, brace pattern, pipe:), or for texts a .txt file with one caption a line (all read by
openalign.data.sources). The output layout, resumption and rank sharding are those of
openalign.inference.embedding_folder. Under torchrun each rank loads the model on its own device and writes its
own parts:

    torchrun --nproc-per-node 4 -m openalign embed photos/ --model ckpt --out embeddings
"""

from __future__ import annotations

import argparse
from pathlib import Path

from openalign.cli._common import add_model_arguments, encoders_from_arguments
from openalign.cli._help import add_command


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `embed` command."""
    parser = add_command(
        subparsers, "embed", help="embed a folder, manifest or shards into .npy + Parquet parts",
        description="Embed images and/or captions with a model into a folder of float16 .npy parts and Parquet "
                    "metadata (clip-retrieval's layout), for `openalign index`. Rerun the same command to "
                    "resume; under torchrun each rank writes its own parts.",
        examples=("openalign embed photos/ -m runs/first/model --out embeddings",
                  "openalign embed data/heldout/manifest.jsonl -m kakaobrain/align-base --kind both --out emb",
                  "openalign embed captions.txt -m runs/first/model --out text-embeddings",
                  "torchrun --nproc-per-node 4 -m openalign embed 'data/shards/train-*.tar' -m runs/first/model "
                  "--out train-embeddings"))
    parser.add_argument("sources", nargs="+", help="image folder, manifest, shard spec, or .txt of captions")
    parser.add_argument("--out", "-o", required=True, help="output folder (rerun the same command to resume)")
    parser.add_argument("--kind", default="auto", choices=("auto", "image", "text", "both"),
                        help="what to embed; auto: text for .txt files of captions, images otherwise")
    parser.add_argument("--part-size", type=int, default=10_000, help="items per part file")
    parser.add_argument("--num-workers", type=int, default=2,
                        help="threads decoding images, the next batch while the current one is encoded")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Join torchrun's process group when there is one, embed this rank's parts, print the summary."""
    from openalign.data.sources import DataError, check_source, count_records, is_caption_file, iter_records
    from openalign.distributed import destroy_distributed, init_distributed, rank_and_world_size
    from openalign.inference.embed import embed_to_folder
    from openalign.inference.embedding_folder import write_model_reference

    captions_only = [source for source in args.sources if is_caption_file(source)]
    kind = args.kind
    if kind == "auto":
        kind = "text" if len(captions_only) == len(args.sources) else "image"
    if captions_only and kind != "text":
        raise SystemExit(f"openalign embed: {captions_only[0]} holds captions only; embed it on its own (or with "
                         "--kind text)")
    check_source(args.sources)  # before anything is created or loaded: a mistyped source leaves no folder
    info = init_distributed()
    rank, world_size = rank_and_world_size(from_environment=True)
    # Under torchrun each rank takes the device init_distributed chose for it (cuda:LOCAL_RANK or the CPU).
    device = info.device if world_size > 1 and args.device == "auto" else None
    encoders = encoders_from_arguments(args, device=device)
    encode = {"image": encoders.encode_loaded_images, "text": encoders.encode_texts}
    out = Path(args.out)
    if rank == 0:
        write_model_reference(out, args.model)
    try:
        total = count_records(args.sources) if not args.no_progress and rank == 0 else None
    except DataError:  # the same source is read below, where its error is reported with the rest
        total = None
    try:
        summary = embed_to_folder(
            iter_records(args.sources),
            encode if kind == "both" else encode[kind],
            out,
            kind=kind,
            part_size=args.part_size,
            batch_size=encoders.image_batch_size if kind != "text" else encoders.text_batch_size,
            rank=rank,
            world_size=world_size,
            num_workers=args.num_workers,
            progress=not args.no_progress,
            total=total,
            model=args.model,
        )
    finally:
        destroy_distributed()
    if world_size > 1:
        print(f"rank {rank} of {world_size}: finished its parts of {out}")
    if summary is not None:
        dims = ", ".join(f"{name} {dim}-d" for name, dim in summary["dims"].items())
        print(f"embedded {summary['count']} items ({dims}) into {summary['num_parts']} part(s) of {out}; "
              f"skipped {summary['num_skipped']}")
        for skipped in summary["skipped"]:
            print(f"  skipped {skipped['source']}: {skipped['error']}")
        kinds = summary["kinds"]
        flag = "" if len(kinds) == 1 else f" --embed-kind {kinds[0]}"
        print(f"next: openalign index {out}{flag}")
    return 0
