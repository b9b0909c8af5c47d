"""Training-step throughput and peak memory: openalign's trainer step against transformers' AlignModel doing
the same step (same config, weights, batch, dtype, optimiser), with and without gradient checkpointing; or,
with --demo, the demo's training against an earlier openalign (a git revision). Not a test: the numbers depend
on the machine and its load.

    python benchmarks/train.py [--preset efficientnet-b0+bert-mini] [--image-size 128] [--batch-size 16] [--repeats 2]
    python benchmarks/train.py --demo [--baseline REV] [--steps 100] [--repeats 2] [--n 4000] [--precision auto]

Each measurement runs in a fresh subprocess, so peak memory is that one configuration's: on CUDA
torch.cuda.max_memory_allocated over the first step, on CPU the growth of the peak resident set (ru_maxrss)
over the resident set before the first step (activations, gradients and optimiser state). Both sides run under
the same allocator settings and memory format. openalign's step is the trainer's, from
`openalign.train.loop.build_stepper` (features -> ALIGN loss -> backward -> AdamW); transformers' is
`AlignModel(..., return_loss=True).loss.backward()` -> AdamW.
transformers checkpoints only the text tower (its EfficientNet has no gradient checkpointing), so the
"checkpointing" rows compare text-only checkpointing, and openalign's both-towers row has no peer.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

# glibc keeps large activations in its heap instead of a fresh mmap per tensor (see ALIGN-REFERENCE.md);
# applied to both sides alike.
ALLOCATOR_ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": "1000000000", "MALLOC_TRIM_THRESHOLD_": "10000000000"}
# main before the second round of training-step work in docs/training.md ("The training step on a CPU": fused
# squeeze-excite, bfloat16): what --demo compares with. The first round's baseline was 3d73c4c.
DEMO_BASELINE = "9e2290d3961bdb35d1cc53d1122f97ce97132b5f"


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _inputs(config, batch_size: int, seq_len: int, image_size: int, device):
    import torch

    generator = torch.Generator().manual_seed(0)
    vocab = config.text_config.vocab_size
    batch = {
        "pixel_values": torch.randn(batch_size, 3, image_size, image_size, generator=generator),
        "input_ids": torch.randint(5, vocab, (batch_size, seq_len), generator=generator),
        "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
        "token_type_ids": torch.zeros(batch_size, seq_len, dtype=torch.long),
    }
    return {key: value.to(device) for key, value in batch.items()}


def worker(args: argparse.Namespace) -> dict:
    """Time `args.steps` training steps of one implementation in this process; return the measurements."""
    import torch

    from openalign.losses import AlignLoss
    from openalign.model_config import get_preset
    from openalign.models.align import AlignModel
    from openalign.models.utils import trainable_init
    from openalign.train.loop import build_stepper
    from openalign.train.optim import build_optimizer

    torch.manual_seed(0)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config = get_preset(args.preset)
    config = config.replace(vision_config=config.vision_config.replace(image_size=args.image_size))
    model = AlignModel(config)
    trainable_init(model.vision_model)
    autocast_dtype = {"fp32": None, "bf16": torch.bfloat16}[args.dtype]
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    batch = _inputs(config, args.batch_size, args.seq_len, args.image_size, device)
    batch["pixel_values"] = batch["pixel_values"].contiguous(memory_format=memory_format)

    if args.implementation == "transformers":
        import transformers

        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            theirs = transformers.AlignModel.from_pretrained(folder).train()
        if args.checkpointing != "none":
            theirs.gradient_checkpointing_enable()  # text tower only: EfficientNet does not support it
        theirs.to(device, memory_format=memory_format)
        optimizer = torch.optim.AdamW(theirs.parameters(), lr=1e-4)

        def step():
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss = theirs(**batch, return_loss=True).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        model.text_model.pooler.requires_grad_(False)
        model.gradient_checkpointing_enable(text=args.checkpointing in ("text", "both"),
                                            vision=args.checkpointing == "both")
        model.to(device, memory_format=memory_format)
        optimizer = build_optimizer("adamw", model, lr=1e-4, weight_decay=0.01)
        stepper = build_stepper(model, AlignLoss(label_smoothing=0.1), optimizer, device=device,
                                autocast_dtype=autocast_dtype, channels_last=args.channels_last)

        def step():
            stepper.step(batch, 0)

    # Memory from the first step: later steps reuse the heap the first one grew (the allocator keeps it), so
    # the resident set would no longer show what a step needs. It includes gradients and optimiser state.
    resident_before = _resident_bytes()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - resident_before
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {"samples_per_s": args.batch_size * args.steps / elapsed, "peak_bytes": peak, "device": device.type}


def main() -> None:
    """Run every (implementation, checkpointing) pair in its own process and print a table with ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="efficientnet-b0+bert-mini")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 5; with --demo 100)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda where there is one)")
    parser.add_argument("--json", default=None, help="also write the measurements and ratios to this file")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument("--demo", action="store_true",
                        help="time the demo's training (its model, batch, data and image term) against --baseline")
    parser.add_argument("--baseline", default=DEMO_BASELINE,
                        help="with --demo: the git revision, or a folder holding an openalign package, to compare "
                             f"with (default {DEMO_BASELINE[:7]}, before fused squeeze-excite and bfloat16)")
    parser.add_argument("--n", type=int, default=4000, help="with --demo: generated training pairs")
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs of each side, alternating (the best counts)")
    parser.add_argument("--threads", type=int, default=2, help="with --demo: torch threads (the demo's 2)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="with --demo: the current side's training precision (default auto: as the demo "
                             "chooses it, by measuring); the baseline trains as it did")
    parser.add_argument("--no-image-ssl", dest="image_ssl", action="store_false",
                        help="with --demo: without the label-free image term (the demo's runs under 700 steps)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--implementation", default="openalign", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", default="none", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.steps = args.steps or (100 if args.demo else 5)
    if args.demo:
        from _demo_training import demo_main, demo_worker

        if args.worker:
            print(json.dumps(demo_worker(args)))
        else:
            demo_main(args, __file__)
        return
    if args.worker:
        print(json.dumps(worker(args)))
        return

    shared = [f"--preset={args.preset}", f"--image-size={args.image_size}", f"--batch-size={args.batch_size}",
              f"--seq-len={args.seq_len}", f"--steps={args.steps}", f"--warmup={args.warmup}",
              f"--dtype={args.dtype}"] + ([] if args.channels_last else ["--no-channels-last"]) + (
                  [f"--device={args.device}"] if args.device else [])
    from openalign.runtime import omp_wait_policy

    # The OpenMP wait policy `openalign demo` would choose here and now, for both sides; the environment wins.
    environment = {**os.environ, **ALLOCATOR_ENVIRONMENT,
                   "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", omp_wait_policy())}
    results = {}
    for _ in range(args.repeats):  # alternating; the fastest run of each counts
        for checkpointing in ("none", "text", "both"):
            for implementation in ("openalign", "transformers"):
                if implementation == "transformers" and checkpointing == "both":
                    continue  # no vision checkpointing in transformers
                command = [sys.executable, __file__, "--worker", f"--implementation={implementation}",
                           f"--checkpointing={checkpointing}", *shared]
                output = subprocess.run(command, env=environment, capture_output=True, text=True,
                                        check=True).stdout
                result = json.loads(output.strip().splitlines()[-1])
                best = results.get((implementation, checkpointing))
                if best is None or result["samples_per_s"] > best["samples_per_s"]:
                    results[implementation, checkpointing] = result

    device = results["openalign", "none"]["device"]
    print(f"{args.preset} at {args.image_size} px, batch {args.batch_size}, {args.seq_len} tokens, {args.dtype}, "
          f"channels_last={args.channels_last}, {args.steps} timed steps on {device}, best of {args.repeats} "
          f"alternating runs, OMP_WAIT_POLICY={environment['OMP_WAIT_POLICY']}")
    print("peak memory: " + ("torch.cuda.max_memory_allocated" if device == "cuda" else
                             "growth of peak RSS over RSS before the first step"))
    print(f"{'checkpointing':<28}{'impl':<14}{'samples/s':>11}{'peak MiB':>11}")
    for (implementation, checkpointing), result in results.items():
        label = {"none": "none", "text": "text tower", "both": "both towers (no peer)"}[checkpointing]
        print(f"{label:<28}{implementation:<14}{result['samples_per_s']:>11.1f}"
              f"{result['peak_bytes'] / 2**20:>11.1f}")
    print("ratios openalign / transformers (samples/s: higher is faster; memory: lower is smaller)")
    for checkpointing in ("none", "text"):
        ours, theirs = results["openalign", checkpointing], results["transformers", checkpointing]
        speed = ours["samples_per_s"] / theirs["samples_per_s"]
        memory = ours["peak_bytes"] / max(theirs["peak_bytes"], 1)
        print(f"  checkpointing={checkpointing:<5} speed x{speed:.2f}  peak memory x{memory:.2f}")
    print("transformers' EfficientNet has no gradient checkpointing: with it on, only its text tower recomputes.")
    if args.json:
        rows = [{"implementation": implementation, "checkpointing": checkpointing, **result}
                for (implementation, checkpointing), result in results.items()]
        ratios = {checkpointing: {
            "speed": results["openalign", checkpointing]["samples_per_s"]
            / results["transformers", checkpointing]["samples_per_s"],
            "peak_memory": results["openalign", checkpointing]["peak_bytes"]
            / max(results["transformers", checkpointing]["peak_bytes"], 1)} for checkpointing in ("none", "text")}
        settings = {key: getattr(args, key) for key in ("preset", "image_size", "batch_size", "seq_len", "steps",
                                                          "dtype", "channels_last")}
        with open(args.json, "w") as handle:
            json.dump({**settings, "device": device, "rows": rows, "ratios": ratios}, handle, indent=1)


if __name__ == "__main__":
    main()
