"""`openalign eval retrieval|zero-shot|knn --model CKPT ...`: metrics printed as a table, or as JSON.

    openalign eval retrieval captions.csv --model ckpt               # Karpathy-protocol R@1/5/10 both ways
    openalign eval retrieval photos/ --model ckpt                    # or any source of pairs train takes
    openalign eval zero-shot imagenet/val --model ckpt --confusion cm.png
    openalign eval knn --train imagenet/train --test imagenet/val --model ckpt -k 20
"""

from __future__ import annotations

import argparse

from openalign.cli._common import add_model_arguments, encoders_from_arguments, print_json
from openalign.cli._help import add_command


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--out", "-o", help="also write the results as JSON to this file")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `eval` command and its retrieval / zero-shot / knn sub-commands."""
    examples = {
        "retrieval": ("openalign eval retrieval data/heldout/manifest.jsonl -m runs/first/model",
                      "openalign eval retrieval photos/ -m runs/first/model   # images with .txt captions",
                      "openalign eval retrieval coco-karpathy-test.csv -m kakaobrain/align-base --out coco.json"),
        "zero-shot": ("openalign eval zero-shot imagenet/val -m runs/first/model --confusion confusion.png",),
        "knn": ("openalign eval knn --train imagenet/train --test imagenet/val -m runs/first/model -k 20",),
    }
    parser = add_command(subparsers, "eval", help="evaluate a model: retrieval, zero-shot, knn",
                         examples=[example for group in examples.values() for example in group])
    tasks = parser.add_subparsers(dest="eval_task", metavar="TASK")

    retrieval = add_command(
        tasks, "retrieval", help="image-text retrieval on image-caption pairs, one or several captions per image",
        description="Image-text retrieval on (image, caption) pairs, from any source train takes; rows of a "
                    "manifest naming the same image are its captions (Karpathy protocol): recall@1/5/10 both "
                    "ways as fractions of the queries, and mean and median rank.", examples=examples["retrieval"])
    retrieval.add_argument("source", help="a CSV/TSV/JSONL/Parquet manifest (one row per (image, caption)), an "
                                          "image folder with .txt captions, shards, or a caption file")
    retrieval.add_argument("--image-column", help="a manifest's image column (default: detected)")
    retrieval.add_argument("--caption-column", help="a manifest's caption column (default: detected)")
    add_model_arguments(retrieval)
    _add_output_arguments(retrieval)
    retrieval.set_defaults(func=run_retrieval)

    zero_shot = add_command(
        tasks, "zero-shot", help="zero-shot accuracy on a folder of class sub-folders",
        description="Zero-shot classification accuracy (top-1 and top-5, as fractions of the images) on a folder "
                    "of class sub-folders, whose names are the labels.", examples=examples["zero-shot"])
    zero_shot.add_argument("folder", help="folder of class sub-folders (names are the labels)")
    zero_shot.add_argument("--templates", default="imagenet80", help="imagenet80, photo, or a file of templates")
    zero_shot.add_argument("--confusion", help="write the confusion matrix as a PNG here")
    add_model_arguments(zero_shot)
    _add_output_arguments(zero_shot)
    zero_shot.set_defaults(func=run_zero_shot)

    knn = add_command(
        tasks, "knn", help="k-nearest-neighbour accuracy of test images against train images",
        description="k-nearest-neighbour accuracy (top-1 and top-5, as fractions) of test images voted by their "
                    "neighbours among train images.", examples=examples["knn"])
    knn.add_argument("--train", required=True, help="folder of class sub-folders (the neighbours)")
    knn.add_argument("--test", required=True, help="folder of class sub-folders (the queries)")
    knn.add_argument("-k", type=int, default=20, help="neighbours")
    knn.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(similarity / temperature)")
    add_model_arguments(knn)
    _add_output_arguments(knn)
    knn.set_defaults(func=run_knn)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def _report(metrics: dict, title: str, args: argparse.Namespace) -> int:
    from openalign.eval.report import report, write_json

    if args.json:
        print_json(metrics)
        if args.out:
            write_json(metrics, args.out)
    else:
        report(metrics, title=title, json_path=args.out)
    return 0


def run_retrieval(args: argparse.Namespace) -> int:
    """Retrieval metrics on a source of pairs."""
    from openalign.eval.runner import evaluate_retrieval_pairs

    metrics = evaluate_retrieval_pairs(encoders_from_arguments(args), args.source,
                                       image_column=args.image_column, caption_column=args.caption_column)
    return _report(metrics, f"retrieval on {args.source} (recall as a fraction of the queries; ties broken at "
                            "random, expected value)", args)


def run_zero_shot(args: argparse.Namespace) -> int:
    """Zero-shot metrics on class folders; per-class accuracy goes to the JSON, the table shows the totals."""
    from openalign.eval.runner import evaluate_zero_shot_folder
    from openalign.figures import check_figure_path

    if args.confusion:
        check_figure_path(args.confusion)  # before the model loads
    metrics = evaluate_zero_shot_folder(encoders_from_arguments(args), args.folder, templates=args.templates,
                                        confusion_png=args.confusion)
    result = _report(metrics, f"zero-shot on {args.folder} (accuracy as a fraction of the images)", args)
    if not args.json:
        from openalign.eval.report import format_rows

        rows = [{"class": name, "accuracy": accuracy}
                for name, accuracy in zip(metrics["class_names"], metrics["per_class_accuracy"])]
        print("\n" + format_rows(rows, precision=3))
    return result


def run_knn(args: argparse.Namespace) -> int:
    """kNN metrics on train / test class folders."""
    from openalign.eval.runner import evaluate_knn_folders

    metrics = evaluate_knn_folders(encoders_from_arguments(args), args.train, args.test, k=args.k,
                                   temperature=args.temperature)
    return _report(metrics, f"kNN ({args.test} against {args.train}; accuracy as a fraction of the images)", args)
