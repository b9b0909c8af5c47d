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

from openalign.cli._common import add_model_arguments, encoders_from_arguments, reports_errors


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `embed` command."""
    parser = subparsers.add_parser("embed", help="embed a folder, manifest or shards into .npy + Parquet parts")
    parser.add_argument("sources", nargs="+", help="image folder, manifest, shard spec, or .txt of captions")
    parser.add_argument("--out", "-o", required=True, help="output folder (rerun the same command to resume)")
    parser.add_argument("--kind", default="image", choices=("image", "text", "both"), help="what to embed")
    parser.add_argument("--part-size", type=int, default=10_000, help="items per part file (default 10000)")
    parser.add_argument("--num-workers", type=int, default=0, help="threads decoding each batch's images")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_arguments(parser)
    parser.set_defaults(func=run)


@reports_errors("embed")
def run(args: argparse.Namespace) -> int:
    """Join torchrun's process group when there is one, embed this rank's parts, print the summary."""
    from openalign.data.sources import is_caption_file, iter_records
    from openalign.distributed import destroy_distributed, init_distributed, rank_and_world_size
    from openalign.inference.embed import embed_to_folder
    from openalign.inference.embedding_folder import write_model_reference

    captions_only = [source for source in args.sources if is_caption_file(source)]
    if captions_only and args.kind != "text":
        raise SystemExit(f"openalign embed: {captions_only[0]} holds captions only; use --kind text")
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
        summary = embed_to_folder(
            iter_records(args.sources),
            encode if args.kind == "both" else encode[args.kind],
            out,
            kind=args.kind,
            part_size=args.part_size,
            batch_size=encoders.image_batch_size if args.kind != "text" else encoders.text_batch_size,
            rank=rank,
            world_size=world_size,
            num_workers=args.num_workers,
            progress=not args.no_progress,
        )
    finally:
        destroy_distributed()
    print(f"rank {rank} of {world_size}: finished its parts of {out}")
    if summary is not None:
        print(f"embedded {summary['count']} items ({', '.join(summary['kinds'])}, dims {summary['dims']}) "
              f"in {summary['num_parts']} parts; skipped {summary['num_skipped']}")
        for skipped in summary["skipped"]:
            print(f"  skipped {skipped['source']}: {skipped['error']}")
    return 0
