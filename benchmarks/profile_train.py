"""Where the demo's training step spends its time: torch.profiler over the trainer's step (the demo's model,
batch, loss with the image term, AdamW, channels-last) on real batches of the demo's generated data.

    python benchmarks/profile_train.py [--n 2000] [--steps 3] [--threads 2] [--no-image-ssl] [--rows 20]

Prints the operators by self CPU time (the share of the step each takes) and the step's split between the
image tower, the text tower, the loss and the optimiser, read from the profiler's record_function ranges
around them. Not a test; the shares hold on a loaded machine better than the times do.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="generated training pairs")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (after two warm-up steps)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-image-ssl", dest="image_ssl", action="store_false")
    parser.add_argument("--rows", type=int, default=20)
    args = parser.parse_args()

    from openalign.runtime import configure_allocator

    configure_allocator()
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    torch.set_num_threads(args.threads)
    from openalign.demo.pipeline import DemoConfig, prepare_data, probe_stepper, train_tokenizer, training_config
    from openalign.train.builders import build_loaders

    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch)
        config = DemoConfig(out_dir=str(out), n=args.n, heldout_n=10, seen_n=0, curation="rules",
                            image_ssl_weight=0.5 if args.image_ssl else 0.0, progress=False)
        manifest, _, _ = prepare_data(config, out, {})
        tokenizer = train_tokenizer(config, manifest, out / "tokenizer", {})
        model_config = config.model_config(tokenizer.vocab_size)
        model_config.to_json_file(out / "model_config.json")
        train_config = training_config(config, manifest, out / "tokenizer", out / "model_config.json", out / "run",
                                       args.steps + 2, 60.0)
        loader, _ = build_loaders(train_config, tokenizer, model_config.vision_config.image_size)
        iterator = iter(loader)
        batches = [next(iterator) for _ in range(args.steps + 2)]
        model, stepper = probe_stepper(model_config, train_config)
        for hook_owner, name in ((model.vision_model, "image tower"), (model.text_model, "text tower")):
            _label_forward(hook_owner, name, record_function)
        for number, batch in enumerate(batches[:2], start=1):
            stepper.step(batch, number)
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            for number, batch in enumerate(batches[2:], start=3):
                with record_function("step"):
                    stepper.step(batch, number)
    averages = profiler.key_averages()
    total = sum(event.self_cpu_time_total for event in averages)
    print(f"demo step, batch {config.batch_size}, {args.steps} profiled steps, {args.threads} threads, image term "
          f"{'on' if args.image_ssl else 'off'}: {total / 1e6 / args.steps:.2f} s of self CPU time per step")
    ranges = {event.key: event.cpu_time_total for event in averages if event.key in ("image tower", "text tower")}
    step = next((event.cpu_time_total for event in averages if event.key == "step"), None)
    if step:
        print("forward ranges as a share of the step: " + ", ".join(
            f"{name} {value / step:.1%}" for name, value in ranges.items()) + " (backward and the optimiser are "
            "the rest)")
    print(f"{'operator':45} {'share':>7} {'ms/step':>9} {'calls/step':>11}")
    for event in sorted(averages, key=lambda event: -event.self_cpu_time_total)[: args.rows]:
        print(f"{event.key[:45]:45} {event.self_cpu_time_total / total:7.1%} "
              f"{event.self_cpu_time_total / 1e3 / args.steps:9.1f} {event.count / args.steps:11.0f}")


def _label_forward(module, name: str, record_function) -> None:
    """Wrap `module`'s forward in a profiler range named `name`."""
    forward = module.forward

    def labelled(*args, **kwargs):
        with record_function(name):
            return forward(*args, **kwargs)

    module.forward = labelled


if __name__ == "__main__":
    main()
