"""Arguments shared by the commands that load a checkpoint's encoders (zero-shot, embed, search, eval, compare)."""

from __future__ import annotations

import argparse
import json


def add_model_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """--model, --device, --dtype, --batch-size, --no-optimize."""
    parser.add_argument("--model", "-m", required=required,
                        help="a model folder (a run's model/ or checkpoint-N/, anything save_pretrained wrote: "
                             "config.json, weights, tokenizer files) or a hub id such as kakaobrain/align-base")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="inference precision")
    parser.add_argument("--batch-size", type=int, default=None, help="items per forward (default: tuned per tower)")
    parser.add_argument("--no-optimize", action="store_true",
                        help="run the plain model instead of its optimize_for_inference copy")


def number_in_range(kind: type, low, high):
    """An argparse type: a number of kind (int or float) from low to high, or one line naming the range (no
    silent wrap of a port, no traceback for 1e400)."""
    noun = "an integer" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if not low <= value <= high:  # NaN and infinities fail this too
            raise argparse.ArgumentTypeError(f"{text} is outside {low}..{high}")
        return value

    return parse


def encoders_from_arguments(args: argparse.Namespace, device=None):
    """Load the encoders the arguments describe, after opting in to the allocator settings that keep freed
    activations in the heap (openalign's command-line entry points do; see openalign/runtime.py)."""
    from openalign.inference.encoders import load_encoders
    from openalign.runtime import configure_allocator

    configure_allocator()
    return load_encoders(args.model, device=device or args.device, dtype=args.dtype, batch_size=args.batch_size,
                         optimize=not args.no_optimize)


def print_json(value) -> None:
    """Print value as indented JSON (numpy values and NaN made JSON-safe)."""
    from openalign.eval.report import to_jsonable

    print(json.dumps(to_jsonable(value), indent=1))


