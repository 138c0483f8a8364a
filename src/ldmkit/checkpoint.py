"""Reading and writing weights and training state: a leaf every layer may use.

Safe by default: every read goes through `load_file`, which uses safetensors or
`torch.load(weights_only=True)`. A file that needs full unpickling (it names Python objects beyond tensors,
numbers, strings and containers) is refused with one line, since unpickling can run arbitrary code.

Training checkpoints are written atomically (temporary file, fsync, rename) with a SHA-256 of their bytes in a
sidecar file `ckpt-N.pt.sha256`, written before the checkpoint appears under its final name. On resume, a
checkpoint whose bytes do not match its checksum, that cannot be read, or that lacks a part of the training
state is reported in one line and the previous intact one is used.

Sharded runs (FSDP/HSDP) write `ckpt-N.dcp/`, a torch.distributed.checkpoint (DCP) folder: every process writes
its own shards of the model, EMA and optimizer state into `ckpt-N.dcp.tmp/`, process 0 adds `ldmkit.pt` (the rest
of the state, with its checksum) and renames the folder once all have finished, so a folder under its final name
is complete. DCP itself unpickles its `.metadata` and any non-tensor entries without restriction; ldmkit reads
both through a restricted unpickler and weights_only, so a sharded checkpoint runs no code either.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import re
import shutil
import sys
import warnings
from pathlib import Path

import torch
import torch.nn as nn

CKPT_PATTERN = re.compile(r"ckpt-(\d+)\.(pt|dcp)$")
SHARDED_META = "ldmkit.pt"  # inside a ckpt-N.dcp folder: everything but the sharded tensors
SHARDED_PARTS = ("model", "ema", "optimizer")  # what the DCP files of a sharded checkpoint hold
CHECKSUM_SUFFIX = ".sha256"
# What a training checkpoint must hold to resume from it.
TRAINING_KEYS = ("model", "ema", "optimizer", "images_seen", "step", "rng", "config")
# What torch.load raises for a file it cannot (or may not) read.
READ_ERRORS = (
    pickle.UnpicklingError,
    RuntimeError,
    EOFError,
    ValueError,
    OSError,
    AttributeError,
    KeyError,
    TypeError,
    IndexError,
    ImportError,
)
# Plain attribute containers some published training scripts store beside their weights (DiT's and MDT's
# train.py save their argparse arguments): rebuilding one runs no code, so weights_only may accept it.
SAFE_GLOBALS = [argparse.Namespace]


class CheckpointError(ValueError):
    """A checkpoint or weights file that cannot be used here, reported as one line."""


class UnsafeFileError(CheckpointError):
    """A file that only full unpickling could read (which can run code): refused."""


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [""])[0][:160]


def load_file(path: str | Path, trust_pickle: bool = False) -> dict:
    """The contents of a weights or state file (.safetensors, or a torch.save file read with weights_only=True).

    trust_pickle=True reads a file that needs full unpickling; it prints a warning, and only `ldmkit convert
    --trust-pickle` passes it, for a file the user vouches for."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file as load_safetensors

        try:
            return load_safetensors(str(path))
        except Exception as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({_first_line(e)})") from None
    if trust_pickle:
        print(
            f"WARNING: reading {path} with full unpickling (--trust-pickle): a malicious file can run any code "
            "on this machine. Do this only for files from a source you trust.",
            file=sys.stderr,
            flush=True,
        )
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise CheckpointError(f"{path} cannot be read ({type(e).__name__}: {_first_line(e)})") from None
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except READ_ERRORS as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:  # it names a Python object that only full unpickling would build
            what = f" (it references {found.group(1)})"
            raise UnsafeFileError(
                f"{path} needs full unpickling to load{what}, which can run code, so ldmkit refuses it; if you trust "
                f"its source, rewrite it once as plain weights with `ldmkit convert {path} --trust-pickle --out NEW.pt`"
            ) from None
        detail = re.search(r"Unsupported operand \d+|invalid load key[^.]*", str(e))
        raise CheckpointError(
            f"{path} is not a readable weights file "
            f"({detail.group(0) if detail else type(e).__name__ + ': ' + _first_line(e)})"
        ) from None


class _HashingWriter:
    """A file object that hashes what passes through it."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def file_sha256(path: str | Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            sha.update(chunk)
    return sha.hexdigest()


def _write_atomic_bytes(data: bytes, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_save(obj, path: str | Path) -> None:
    """Write obj to a temporary file in the same folder, fsync, record its checksum, then rename: a crash
    leaves the old file, and a file under its final name always has its checksum beside it."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        writer = _HashingWriter(f)
        torch.save(obj, writer)
        f.flush()
        os.fsync(f.fileno())
    _write_atomic_bytes(f"{writer.sha.hexdigest()}  {path.name}\n".encode(), checksum_path(path))
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def checksum_path(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + CHECKSUM_SUFFIX)


def verify_checksum(path: str | Path) -> None:
    """Raise CheckpointError when the file's bytes do not match its recorded checksum. A checkpoint written
    before checksums existed (no sidecar) passes; reading it still catches truncation."""
    path = Path(path)
    side = checksum_path(path)
    if not side.is_file():
        return
    recorded = side.read_text().split()[:1]
    if not recorded or recorded[0] != file_sha256(path):
        raise CheckpointError(f"checkpoint {path} is corrupt or incomplete (its bytes do not match {side.name})")


def checkpoint_path(run_dir: Path, images_seen: int, sharded: bool = False) -> Path:
    return Path(run_dir) / "checkpoints" / f"ckpt-{images_seen:010d}.{'dcp' if sharded else 'pt'}"


def is_sharded(path: str | Path) -> bool:
    return Path(path).is_dir() and Path(path).suffix == ".dcp"


def list_checkpoints(run_dir: Path) -> list[Path]:
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = (p for p in folder.iterdir() if CKPT_PATTERN.search(p.name))
    return sorted(found, key=lambda p: int(CKPT_PATTERN.search(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path: str | Path, require: tuple[str, ...] = (), tensors: bool = True) -> dict:
    """A checkpoint's state, checked against its checksum; keys in require must be present. A sharded checkpoint
    (ckpt-N.dcp) is read whole into this process; with tensors=False only its non-sharded part is read, and
    state["sharded"] names the folder that holds the rest (resume loads it sharded: load_sharded)."""
    path = Path(path)
    if is_sharded(path):
        state = _load_sharded_checkpoint(path, tensors)
    else:
        if not path.is_file():
            raise CheckpointError(f"checkpoint not found: {path}")
        verify_checksum(path)
        state = load_file(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not an ldmkit checkpoint (it holds a {type(state).__name__})")
    missing = [k for k in require if k not in state]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} lacks '{missing[0]}' ({len(missing)} part(s) of the training state missing)"
        )
    return state


def newest_intact_checkpoint(
    run_dir: Path, require: tuple[str, ...] = TRAINING_KEYS, report=lambda line: None, tensors: bool = True
) -> tuple[Path | None, dict | None]:
    """(path, state) of the newest checkpoint that verifies and loads, reporting each newer one skipped in one
    line; (None, None) when the run has none. A run whose checkpoints are all unusable raises the newest error."""
    errors = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            state = load_checkpoint(path, require, tensors)
        except CheckpointError as e:
            errors.append((path, e))
            continue
        for skipped, e in errors:
            report(f"skipping {skipped.name}: {e}")
        return path, state
    if errors:
        raise CheckpointError(f"no usable checkpoint in {Path(run_dir) / 'checkpoints'} (the newest: {errors[0][1]})")
    return None, None


def remove_partial_writes(run_dir: Path) -> list[Path]:
    """Delete the temporary files and folders of checkpoint writes a crash interrupted (never a finished one)."""
    folder = Path(run_dir) / "checkpoints"
    partial = sorted(folder.glob("*.tmp")) if folder.is_dir() else []
    for path in partial:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    return partial


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (keep >= 1: the newest is never deleted)."""
    for old in list_checkpoints(run_dir)[: -max(keep, 1)]:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
            checksum_path(old).unlink(missing_ok=True)


# ------------------------------------------------------------------------------ sharded (DCP) checkpoints
class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata objects and nothing else: its own dataclasses, torch dtypes, layouts, memory formats
    and sizes, and plain containers."""

    def find_class(self, module: str, name: str):
        if module.startswith("torch.distributed.checkpoint."):
            found = super().find_class(module, name)
            if isinstance(found, type) and found.__module__.startswith("torch.distributed.checkpoint."):
                return found  # its metadata dataclasses and enums, not anything those modules import
        elif (module, name) in _SAFE_METADATA_GLOBALS:
            return super().find_class(module, name)
        elif module == "torch" and isinstance(getattr(torch, name, None), TORCH_CONSTANTS):
            return getattr(torch, name)
        raise CheckpointError(f"refusing to unpickle {module}.{name} from a sharded checkpoint's metadata")


TORCH_CONSTANTS = (torch.dtype, torch.layout, torch.memory_format)
_SAFE_METADATA_GLOBALS = {
    ("torch", "Size"),
    ("collections", "OrderedDict"),
    ("copyreg", "_reconstructor"),
    ("copyreg", "__newobj__"),
    ("builtins", "object"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("torch.serialization", "_get_layout"),  # a layout by name
    ("pathlib", "PosixPath"),  # where it was saved (StorageMeta.checkpoint_id)
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
}


def _dcp_reader(path: Path):
    """A DCP FileSystemReader whose metadata goes through the restricted unpickler."""
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        def read_metadata(self):
            with open(Path(self.path) / ".metadata", "rb") as f:
                try:
                    metadata = _MetadataUnpickler(f).load()
                except CheckpointError:
                    raise
                except Exception as e:
                    raise CheckpointError(f"{path}/.metadata cannot be read ({_first_line(e)})") from None
            if getattr(metadata, "storage_meta", None) is not None:
                metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def _safe_load_planner():
    """DCP's load planner, with non-tensor entries read by torch.load(weights_only=True)."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class SafeLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value) -> None:
            with torch.serialization.safe_globals(SAFE_GLOBALS):
                obj = torch.load(value, weights_only=True)
            target = self.mappings[read_item.dest_index.fqn] if self.flatten_state_dict else None
            if target is not None:
                from torch.distributed.checkpoint._nested_dict import set_element

                set_element(self.original_state_dict, target, obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafeLoadPlanner()


def _load_sharded_checkpoint(path: Path, tensors: bool) -> dict:
    meta_file = path / SHARDED_META
    if not meta_file.is_file() or not (path / ".metadata").is_file():
        raise CheckpointError(f"sharded checkpoint {path} is incomplete (no {SHARDED_META} or .metadata)")
    verify_checksum(meta_file)
    state = load_file(meta_file)
    if not isinstance(state, dict):
        raise CheckpointError(f"{meta_file} is not an ldmkit checkpoint part")
    reader = _dcp_reader(path)
    entries = reader.read_metadata().state_dict_metadata  # read (and checked) once
    stored = {key.split(".")[0] for key in entries}
    missing = [part for part in SHARDED_PARTS if part not in stored]
    if missing:
        raise CheckpointError(f"sharded checkpoint {path} lacks '{missing[0]}'")
    if not tensors:
        return {**state, **dict.fromkeys(SHARDED_PARTS, None), "sharded": path}
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    # A flat template of every stored entry, filled in place (entries are stored under dotted names).
    flat = {
        name: torch.empty(item.size, dtype=item.properties.dtype) if isinstance(item, TensorStorageMetadata) else None
        for name, item in entries.items()
    }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "torch.distributed is not initialized: loading in one process"
            dcp.load(flat, storage_reader=reader, planner=_safe_load_planner(), no_dist=True)
    except CheckpointError:
        raise
    except Exception as e:
        detail = f"{type(e).__name__}: {_first_line(e)}"
        raise CheckpointError(f"sharded checkpoint {path} cannot be read ({detail})") from None
    parts = {
        "model": {},
        "ema": {},
        "optimizer": {"state": {}, "param_groups": state.pop("optimizer_param_groups", [])},
    }
    for name, value in flat.items():
        part, rest = name.split(".", 1)
        if part == "optimizer":  # optimizer.state.<parameter name>.<moment>
            parameter, moment = rest.removeprefix("state.").rsplit(".", 1)
            parts["optimizer"]["state"].setdefault(parameter, {})[moment] = value
        else:
            parts[part][rest] = value
    return {**state, **parts}


def save_sharded(tensors: dict, meta: dict, path: Path, d, async_save: bool = False):
    """Write a sharded checkpoint collectively: every process its shards of `tensors` into path.tmp; then
    PendingCheckpoint.finish has process 0 write `meta` and rename the folder. With async_save the shards are staged
    in CPU memory and written by a background thread. Returns the PendingCheckpoint."""
    import torch.distributed.checkpoint as dcp

    tmp = path.with_name(path.name + ".tmp")
    group = d.cpu_group if d.world_size > 1 else None
    if async_save:
        # The background write runs its own collectives: on a group of its own, or they would interleave with
        # training's collectives on the same group.
        future = dcp.async_save(tensors, checkpoint_id=str(tmp), process_group=_async_group(d))
    else:
        dcp.save(tensors, checkpoint_id=str(tmp), process_group=group)
        future = None
    return PendingCheckpoint(future, tmp, path, meta)


_ASYNC_GROUP = {}


def _async_group(d):
    """A gloo group for asynchronous checkpoint writes, created once (by every process together)."""
    if d.world_size == 1:
        return None
    if "group" not in _ASYNC_GROUP:
        import torch.distributed as dist

        _ASYNC_GROUP["group"] = dist.new_group(backend="gloo")
    return _ASYNC_GROUP["group"]


class PendingCheckpoint:
    """A sharded checkpoint whose shards are (being) written; finish() waits for them, then process 0 writes the
    rest of the state and renames the folder to its final name (every process must call it)."""

    def __init__(self, future, tmp: Path, path: Path, meta: dict):
        self.future, self.tmp, self.path, self.meta = future, tmp, path, meta

    def finish(self, d) -> Path:
        import torch.distributed as dist

        if self.future is not None:
            self.future.result()
        if d.world_size > 1:
            dist.barrier(group=d.cpu_group)
        if d.is_main:
            atomic_save(self.meta, self.tmp / SHARDED_META)
            os.replace(self.tmp, self.path)
            _fsync_dir(self.path.parent)
        if d.world_size > 1:
            dist.barrier(group=d.cpu_group)
        return self.path


def load_sharded(target: dict, path: Path, d) -> None:
    """Fill `target` (state dicts whose tensors may be sharded differently than when saved: DCP reshards) from
    the sharded checkpoint at path, collectively."""
    import torch.distributed.checkpoint as dcp

    group = d.cpu_group if d.world_size > 1 else None
    dcp.load(target, storage_reader=_dcp_reader(path), planner=_safe_load_planner(), process_group=group)


def nonfinite_count(tensors) -> torch.Tensor:
    """Number of non-finite values over floating tensors, as a device tensor (no host sync until read)."""
    counts = [(~torch.isfinite(t)).sum() for t in tensors if t.is_floating_point()]
    return torch.stack(counts).sum() if counts else torch.zeros((), dtype=torch.long)


def load_weights(model: nn.Module, state_dict: dict, source: str) -> None:
    """Strict load with a one-line error naming the first tensor that does not fit."""
    check_fits(model, state_dict, source)
    model.load_state_dict(state_dict)


def check_fits(model: nn.Module, state_dict: dict, source: str) -> None:
    """A one-line CheckpointError naming the first tensor of state_dict that does not fit the model (a sharded
    model's tensors have their global shapes)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [k for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if missing or unexpected or mismatched:
        if mismatched:
            k = mismatched[0]
            detail = f"tensor '{k}' has shape {list(state_dict[k].shape)} there and {list(own[k].shape)} here"
        elif missing:
            detail = f"tensor '{missing[0]}' is missing ({len(missing)} missing)"
        else:
            detail = f"tensor '{unexpected[0]}' is not in this model ({len(unexpected)} unexpected)"
        raise CheckpointError(f"{source} does not fit this model (another architecture?): {detail}")


def run_checkpoint(source: str | Path, require: tuple[str, ...] = ("config",)) -> tuple[Path, dict, Path | None]:
    """(checkpoint path, state, run folder or None) of a run folder (its newest intact checkpoint; newer broken
    ones are reported on stderr) or of a checkpoint file. One-line CheckpointErrors otherwise."""
    source = Path(source)
    if source.is_dir() and not is_sharded(source):
        if not (source / "checkpoints").is_dir():
            raise CheckpointError(f"{source} is not an ldmkit run folder (no checkpoints/)")
        path, state = newest_intact_checkpoint(source, require, report=lambda line: print(line, file=sys.stderr))
        if path is None:
            raise CheckpointError(f"no checkpoint in run folder {source} (expected {source}/checkpoints/ckpt-*.pt)")
        return path, state, source
    state = load_checkpoint(source, require)
    return source, state, source.parent.parent if source.parent.name == "checkpoints" else None
