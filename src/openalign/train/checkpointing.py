"""Run checkpoints: `checkpoint-{step:08d}/` folders that survive a kill at any moment.

A checkpoint holds the model in transformers' layout (`config.json` + `model.safetensors`, so
`AlignModel.from_pretrained` reads it), `trainer_state.pt` (optimiser, scheduler, scaler, EMA, RNG states, data
position, step, the run's configuration; tensors and plain containers only, loaded with `weights_only=True`)
and `files.json`, the byte size and SHA-256 of every file, written last. The folder is assembled under a hidden
temporary name and renamed into place, so a folder with the final name is complete unless something damaged it
later; `files.json` catches that case (a missing, truncated or altered file: one flipped byte) and `--resume
latest` falls back to the previous checkpoint. A full disk is a DiskFullError naming the file, and leaves the
checkpoints before it intact.

Under FSDP2 the model and the optimiser state are sharded over ranks: `gather_model_state` and
`gather_optimizer_state` assemble the full ones (collectives: every rank calls them) for rank 0 to write.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from openalign.errors import CheckpointError, ConfigError
from openalign.files import DiskFullError, describe_files, files_problem, fsync_path, reporting_full_disk
from openalign.model_config import AlignConfig
from openalign.train.run_log import METRICS_NAME
from openalign.untrusted import refuse_links

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d{8})$")
TRAINER_STATE_NAME = "trainer_state.pt"
FILES_NAME = "files.json"
CONFIG_NAME = "config.yaml"
# What a run writes into its folder besides checkpoints, removed with them when a fresh run overwrites it.
RUN_OUTPUTS = ("model", "model-ema", "plots", "tensorboard")


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint taken after `step` optimiser steps."""
    return f"checkpoint-{step:08d}"


def gather_model_state(model: torch.nn.Module, fsdp: bool) -> dict[str, torch.Tensor]:
    """The model's state dict; under FSDP2 the full one, gathered from every rank's shards onto the CPU."""
    if not fsdp:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def gather_optimizer_state(holder: torch.nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool) -> dict:
    """The optimiser's state dict; under FSDP2 the full one (keyed through `holder`, the modules the optimiser
    was built over with the sharded root in place of the model), gathered onto the CPU."""
    if not fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(holder, optimizer, options=options)


def load_optimizer_state(holder: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict, fsdp: bool) -> None:
    """Load what `gather_optimizer_state` returned; under FSDP2 each rank keeps its shards of it."""
    if not fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(holder, optimizer, state, options=StateDictOptions(full_state_dict=True))


class StateDictWriter:
    """What `save_checkpoint` needs of a model (save_pretrained), for a state dict gathered from shards, and
    the processor the model is used with, so that the folder serves every command as it is."""

    def __init__(self, config: AlignConfig, state_dict: dict[str, torch.Tensor], processor=None,
                 extras: list[Callable[[Path], None]] | None = None):
        self.config, self.state_dict, self.processor = config, state_dict, processor
        self.extras = extras or []

    def save_pretrained(self, folder) -> None:
        """Write config.json and the weights into `folder`, in transformers' layout, the processor's tokenizer
        files and image settings when there is one, and what each of `extras(folder)` writes (a run's per-pair
        scores), all inside the checkpoint and its files.json."""
        from openalign.pretrained import write_checkpoint

        write_checkpoint(folder, self.config, self.state_dict)
        if self.processor is not None:
            self.processor.save_pretrained(folder)
        for extra in self.extras:
            extra(Path(folder))


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    trainer_state: dict[str, Any],
    keep_last: int | None = None,
) -> Path:
    """Write `checkpoint-{step}` atomically, then delete all but the newest `keep_last` checkpoints.

    `model` needs `save_pretrained(folder)`; `trainer_state` may hold only tensors, numbers, strings, None and
    lists/tuples/dicts of them (what `torch.load(weights_only=True)` accepts).
    """
    run_dir = Path(run_dir)
    final = run_dir / checkpoint_name(step)
    temporary = run_dir / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    try:
        model.save_pretrained(temporary)
        with reporting_full_disk(temporary / TRAINER_STATE_NAME), open(temporary / TRAINER_STATE_NAME, "wb") as handle:
            torch.save(trainer_state, handle)  # to a file object, so that a full disk's OSError reaches us
        files = sorted(path for path in temporary.iterdir() if path.is_file())
        listing = {"step": step, **describe_files(temporary, files)}
        with reporting_full_disk(temporary / FILES_NAME):
            (temporary / FILES_NAME).write_text(json.dumps(listing, indent=1) + "\n")
        for path in temporary.iterdir():
            fsync_path(path)
        if final.exists():  # the same step saved again (a resumed run that stops where it resumed)
            stale = run_dir / f".{final.name}.old-{os.getpid()}"
            final.rename(stale)
            temporary.rename(final)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            temporary.rename(final)
        fsync_path(run_dir)
    except DiskFullError as error:
        shutil.rmtree(temporary, ignore_errors=True)
        raise DiskFullError(f"{error}; {final.name} was not written, the checkpoints before it are intact") \
            from error.__cause__
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if keep_last is not None:
        prune_checkpoints(run_dir, keep_last)
    return final


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint folder in `run_dir`, oldest first; completeness is not checked."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for path in run_dir.iterdir():
        match = CHECKPOINT_PATTERN.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def verify_checkpoint(folder: str | os.PathLike) -> None:
    """Raise CheckpointError naming the folder and the file when a checkpoint is incomplete or truncated."""
    folder = Path(folder)
    listing = folder / FILES_NAME
    if not listing.is_file():
        raise CheckpointError(f"checkpoint {folder} is incomplete: no {FILES_NAME} (it was never finished)")
    try:
        written = json.loads(listing.read_text())
        sizes, digests = written["sizes"], written.get("sha256", {})  # checkpoints before checksums have none
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(f"checkpoint {folder}: {FILES_NAME} is unreadable ({error})") from None
    for required in (TRAINER_STATE_NAME, "config.json"):
        if required not in sizes:
            raise CheckpointError(f"checkpoint {folder}: {FILES_NAME} does not list {required}")
    problem = files_problem(folder, sizes, digests)
    if problem is not None:
        raise CheckpointError(f"checkpoint {folder}: {problem}")


def resolve_checkpoint(run_dir: str | os.PathLike, spec: str) -> Path:
    """The checkpoint folder to resume from: "latest" (the newest complete one in `run_dir`, skipping and
    logging damaged ones) or a path, which must be complete."""
    if spec != "latest":
        folder = Path(spec)
        if not folder.is_dir():
            raise CheckpointError(f"no checkpoint folder at {folder}")
        verify_checkpoint(folder)
        return folder
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise CheckpointError(f"--resume latest: no checkpoint-* folder in {run_dir}")
    for _, folder in reversed(checkpoints):
        try:
            verify_checkpoint(folder)
            return folder
        except CheckpointError as error:
            logger.warning("skipping damaged checkpoint: %s", error)
    raise CheckpointError(f"--resume latest: none of the {len(checkpoints)} checkpoints in {run_dir} is complete")


def load_trainer_state(folder: str | os.PathLike) -> dict[str, Any]:
    """The `trainer_state.pt` of a checkpoint, read with `weights_only=True` (no code runs on load)."""
    path = Path(folder) / TRAINER_STATE_NAME
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {folder} has no {TRAINER_STATE_NAME}") from None
    except Exception as error:  # a damaged pickle raises many types
        raise CheckpointError(f"{path} cannot be read: {error}") from None


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints, and temporary folders this process left behind."""
    checkpoints = list_checkpoints(run_dir)
    for _, folder in checkpoints[: max(0, len(checkpoints) - keep_last)]:
        shutil.rmtree(folder, ignore_errors=True)


def prepare_fresh_run(run_dir: str | os.PathLike, overwrite: bool = False, remove: bool = True) -> None:
    """Before a run starts from scratch in `run_dir`: refuse when the folder holds another run's checkpoints
    (keep-last pruning would delete each new checkpoint at once, and `--resume latest` would continue the old
    run), or with `overwrite` remove them and that run's other outputs (only where `remove`: on one rank)."""
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints or (overwrite and not remove):
        return
    if not overwrite:
        names = ", ".join(folder.name for _, folder in checkpoints[-3:])
        raise ConfigError(f"{run_dir} holds another run's checkpoints ({names}): resume it with --resume latest, "
                          "choose another run.out_dir, or pass --overwrite to replace that run")
    logger.warning("--overwrite: removing the %d checkpoints and outputs of the run in %s", len(checkpoints),
                   run_dir)
    for _, folder in checkpoints:
        shutil.rmtree(folder)
    for name in RUN_OUTPUTS:
        shutil.rmtree(Path(run_dir) / name, ignore_errors=True)


def refuse_linked_entries(run_dir: str | os.PathLike) -> None:
    """Refuse a run folder in which what a run writes (config.yaml, metrics.jsonl, checkpoints, model/, plots/,
    ...) is a symbolic link: resuming a received folder would otherwise overwrite or empty files outside it.
    An InputLimitError names the link."""
    run_dir = Path(run_dir)
    if run_dir.is_dir():
        checkpoints = [folder.name for _, folder in list_checkpoints(run_dir)]
        refuse_links(run_dir, [CONFIG_NAME, METRICS_NAME, *RUN_OUTPUTS, *checkpoints], "run folder")


def remove_stale_temporaries(run_dir: str | os.PathLike) -> None:
    """Delete half-written checkpoint folders that a killed run left (hidden `.checkpoint-*` folders)."""
    run_dir = Path(run_dir)
    if run_dir.is_dir():
        for path in run_dir.glob(".checkpoint-*"):
            shutil.rmtree(path, ignore_errors=True)


# -- RNG states as weights_only-safe values ------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """The python, numpy, torch (and CUDA) generator states, as tensors and plain lists."""
    python_version, python_internal, python_gauss = random.getstate()
    numpy_name, numpy_keys, numpy_position, numpy_has_gauss, numpy_gauss = np.random.get_state()
    state = {
        "python": [python_version, list(python_internal), python_gauss],
        "numpy": [
            numpy_name,
            torch.from_numpy(numpy_keys.astype(np.int64)),
            int(numpy_position),
            int(numpy_has_gauss),
            float(numpy_gauss),
        ],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    python_version, python_internal, python_gauss = state["python"]
    random.setstate((python_version, tuple(python_internal), python_gauss))
    numpy_name, numpy_keys, numpy_position, numpy_has_gauss, numpy_gauss = state["numpy"]
    np.random.set_state(
        (numpy_name, numpy_keys.numpy().astype(np.uint32), numpy_position, numpy_has_gauss, numpy_gauss)
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
