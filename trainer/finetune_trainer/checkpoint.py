"""Checkpoints on disk: atomic step-<N>/ directories with a manifest of checksums, retention, discovery.

A checkpoint directory holds
    adapter/            the LoRA weights and adapter config (peft save_pretrained; usable on its own)
    trainer_state.pt    optimizer, scheduler, scaler, step, data position, loss accumulators, restarts
    rng_states.pt       every rank's RNG states (python, numpy, torch CPU and CUDA), by rank
    config.json         the trainer config that wrote it (to name what changed when a resume is refused)
    manifest.json       written last: step, config fingerprint, sha256 and size of every other file
It is written under .tmp-step-<N>-*, fsynced and renamed, so checkpoints/step-<N>/ is always whole; a
checkpoint whose files do not match its manifest is skipped with a warning when resuming.
What goes into trainer_state is decided by the training loop, in one place (Recipe.checkpoint_state).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .contract import ADAPTER_DIR, utc_timestamp
from .files import publish_dir, remove_dir, sha256_file, temporary_dir_for

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
TRAINER_STATE = "trainer_state.pt"
RNG_STATES = "rng_states.pt"
CONFIG = "config.json"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CorruptCheckpoint(Exception):
    """A checkpoint directory whose files do not match its manifest."""


@dataclass
class Checkpoint:
    """What a checkpoint holds besides the adapter weights (those are saved and loaded through peft)."""

    step: int
    fingerprint: str
    trainer_state: dict[str, Any]
    rng_states: list[dict[str, Any]]
    config: dict[str, Any]
    created: str = ""


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete-looking checkpoint directories, newest first (unfinished .tmp-* ones are never listed)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found, reverse=True)


def save_checkpoint(root: Path, checkpoint: Checkpoint, save_adapter: Callable[[Path], None]) -> Path:
    """Write `checkpoint` atomically as root/step-<N>/ and return its path."""
    final = step_dir(root, checkpoint.step)
    temporary = temporary_dir_for(final)
    try:
        save_adapter(temporary / ADAPTER_DIR)
        torch.save(checkpoint.trainer_state, temporary / TRAINER_STATE)
        torch.save(checkpoint.rng_states, temporary / RNG_STATES)
        (temporary / CONFIG).write_text(json.dumps(checkpoint.config, indent=2, sort_keys=True) + "\n")
        files = {
            str(path.relative_to(temporary)): {"sha256": sha256_file(path), "bytes": path.stat().st_size}
            for path in sorted(temporary.rglob("*"))
            if path.is_file()
        }
        manifest = {
            "format": MANIFEST_FORMAT,
            "step": checkpoint.step,
            "fingerprint": checkpoint.fingerprint,
            "created": utc_timestamp(),
            "files": files,
        }
        (temporary / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        publish_dir(temporary, final)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return final


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """The manifest of a checkpoint whose every file matches it; raise CorruptCheckpoint otherwise."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CorruptCheckpoint(f"{path / MANIFEST} is missing or unreadable ({e})") from e
    if manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("files"), dict):
        raise CorruptCheckpoint(f"{path / MANIFEST} is not a format-{MANIFEST_FORMAT} manifest")
    for name, expected in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise CorruptCheckpoint(f"{file} is missing")
        if file.stat().st_size != expected["bytes"]:
            raise CorruptCheckpoint(f"{file} has {file.stat().st_size} bytes, the manifest says {expected['bytes']}")
        if sha256_file(file) != expected["sha256"]:
            raise CorruptCheckpoint(f"{file} does not match its sha256 in the manifest")
    return manifest


def latest_valid_checkpoint(root: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that verifies, with its manifest; newer corrupt ones are set aside with a warning
    (the run will write checkpoints of those step numbers again)."""
    for _step, path in list_checkpoints(root):
        try:
            return path, verify_checkpoint(path)
        except CorruptCheckpoint as e:
            log.warning("skipping corrupt checkpoint %s: %s", path, e)
            set_aside(path)
    return None


def set_aside(path: Path) -> Path:
    """Rename a corrupt checkpoint to .corrupt-step-<N> (replacing an older one): never listed or resumed
    from again, kept for a look until the next corrupt one of that step."""
    aside = path.with_name(f".corrupt-{path.name}")
    if aside.exists():
        remove_dir(aside)
    os.rename(path, aside)
    log.warning("set corrupt checkpoint %s aside as %s", path, aside)
    return aside


def load_checkpoint(path: Path, manifest: dict[str, Any]) -> Checkpoint:
    """Read a verified checkpoint (its files are ours and checksummed, so full unpickling is safe)."""
    path = Path(path)
    return Checkpoint(
        step=manifest["step"],
        fingerprint=manifest["fingerprint"],
        trainer_state=torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=False),
        rng_states=torch.load(path / RNG_STATES, map_location="cpu", weights_only=False),
        config=json.loads((path / CONFIG).read_text()),
        created=manifest.get("created", ""),
    )


def load_adapter_weights(path: Path) -> dict[str, torch.Tensor]:
    """The adapter weights of a checkpoint, as peft saved them (for set_peft_model_state_dict)."""
    from safetensors.torch import load_file

    return load_file(str(Path(path) / ADAPTER_DIR / ADAPTER_WEIGHTS))


def apply_retention(root: Path, keep_last: int, known_valid: set[Path]) -> None:
    """Keep the newest keep_last checkpoints that verify and delete older ones; set corrupt ones aside.

    A corrupt checkpoint never counts towards keep_last, so it can never push out the only valid one.
    known_valid: checkpoints already known to verify (this process wrote or checked them), spared the
    checksums; the ones verified here are added to it.
    """
    kept = 0
    for _step, path in list_checkpoints(root):
        if path not in known_valid:
            try:
                verify_checkpoint(path)
            except CorruptCheckpoint as e:
                log.warning("corrupt checkpoint %s: %s", path, e)
                set_aside(path)
                continue
            known_valid.add(path)
        if kept < keep_last:
            kept += 1
            continue
        log.info("removing old checkpoint %s (checkpoint.keepLast %d)", path, keep_last)
        remove_dir(path)
        known_valid.discard(path)


def remove_unfinished(root: Path) -> None:
    """Delete the leftovers of checkpoints whose writer died before renaming them (or of deletions)."""
    root = Path(root)
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(path, ignore_errors=True)


def changed_fields(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted camelCase paths whose values differ between two config dumps, e.g. training.learningRate."""
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += changed_fields(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key} ({json.dumps(a)} -> {json.dumps(b)})")
    return changed


def capture_rng_state(device: torch.device) -> dict[str, Any]:
    """This process's RNG states: what dropout and any sampling draw from next."""
    import random

    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy

        state["numpy"] = numpy.random.get_state()
    except ImportError:
        pass
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict[str, Any], device: torch.device) -> None:
    import random

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy

        numpy.random.set_state(state["numpy"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
