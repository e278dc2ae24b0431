"""Tensors on disk as safetensors, never pickle: artifacts and DeepSpeed checkpoints.

DeepSpeed decides *what* a checkpoint holds (each rank's ZeRO partition of the optimizer, the
trainable module state, the LR scheduler, client state) and calls a pluggable checkpoint
engine to write and read each file. Its default engine uses ``torch.save`` and loads with
``weights_only=False``: unrestricted pickle. ``SafetensorsCheckpointEngine`` writes the same
state as one safetensors file per DeepSpeed file: the tensors as tensors, and the structure
around them (dicts, lists, numbers, strings) as JSON in the file's metadata. The few DeepSpeed
objects found in its state dicts (enums, loss scalers) are rebuilt from an explicit allowlist;
anything else is refused at save time, so an unreadable checkpoint is never written.

Files keep the names DeepSpeed gives them (``*.pt``) because DeepSpeed looks them up by name;
their content is safetensors. Every file is written to a temporary name and renamed, so a run
killed mid-save leaves no half-written file.

A checkpoint tag is trusted only when complete on every rank: after every rank has written its
files, rank 0 writes ``<tag>/manifest.json`` with each file's size and sha256 (DeepSpeed's own
``latest`` is written by rank 0 alone, possibly before another rank has finished). A resume takes
the newest tag whose manifest is there and whose files all match it (``trusted_tag``); a tag
killed during its save, a file cut short, flipped bytes or a missing rank file are each named in
one line, and the run falls back to the previous complete tag.
"""

from __future__ import annotations

import enum
import hashlib
import importlib
import json
import os
import re
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointCommitInfo, CheckpointEngine
from safetensors import safe_open
from safetensors.torch import save_file

STRUCTURE_KEY = "dtvg_scale.structure"

# Objects DeepSpeed puts into its state dicts that are neither tensors nor plain data.
# Rebuilt by class name + attribute dict; nothing outside this list is ever instantiated.
ALLOWED_OBJECTS = {
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",  # ZeRO-1/2 param slice mappings
}
ALLOWED_ENUM_MODULES = ("deepspeed.",)


def _qualname(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _import(qualname: str) -> Any:
    module, _, name = qualname.rpartition(".")
    return getattr(importlib.import_module(module), name)


class _Encoder:
    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def encode(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            key = f"t{len(self.tensors)}"
            self.tensors[key] = value.detach().cpu().contiguous().clone()
            return {"__tensor__": key}
        if isinstance(value, enum.Enum):
            name = _qualname(value)
            if not name.startswith(ALLOWED_ENUM_MODULES):
                raise TypeError(f"cannot checkpoint enum {name}")
            return {"__enum__": name, "value": value.value}
        if isinstance(value, bool) or value is None or isinstance(value, (int, float, str)):
            return value
        if isinstance(value, torch.Size):
            return {"__size__": list(value)}
        if isinstance(value, torch.dtype):
            return {"__dtype__": str(value).removeprefix("torch.")}
        if isinstance(value, dict):
            return {"__dict__": [[self.encode(k), self.encode(v)] for k, v in value.items()]}
        if isinstance(value, tuple):
            return {"__tuple__": [self.encode(v) for v in value]}
        if isinstance(value, list):
            return [self.encode(v) for v in value]
        name = _qualname(value)
        if name in ALLOWED_OBJECTS:
            return {"__object__": name, "state": self.encode(dict(vars(value)))}
        raise TypeError(f"cannot checkpoint a {name} (not a tensor, plain data, or an allowlisted DeepSpeed object)")


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    if "__tensor__" in node:
        return tensors[node["__tensor__"]]
    if "__dict__" in node:
        return OrderedDict((_decode(k, tensors), _decode(v, tensors)) for k, v in node["__dict__"])
    if "__tuple__" in node:
        return tuple(_decode(v, tensors) for v in node["__tuple__"])
    if "__size__" in node:
        return torch.Size(node["__size__"])
    if "__dtype__" in node:
        return getattr(torch, node["__dtype__"])
    if "__enum__" in node:
        if not node["__enum__"].startswith(ALLOWED_ENUM_MODULES):
            raise ValueError(f"checkpoint names a disallowed enum {node['__enum__']}")
        return _import(node["__enum__"])(node["value"])
    if "__object__" in node:
        if node["__object__"] not in ALLOWED_OBJECTS:
            raise ValueError(f"checkpoint names a disallowed object {node['__object__']}")
        cls = _import(node["__object__"])
        obj = cls.__new__(cls)
        obj.__dict__.update(_decode(node["state"], tensors))
        return obj
    raise ValueError(f"unreadable checkpoint structure node: {sorted(node)}")


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    except Exception as err:
        # safetensors reports a failed write (a full disk, a file-size limit) as SafetensorError
        # "... (os error N)": raise it as the OSError it is, naming the file
        code = re.search(r"os error (\d+)", str(err))
        if code is None or isinstance(err, OSError):
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from err
    finally:
        tmp.unlink(missing_ok=True)


def save_state(state: Any, path: str | os.PathLike) -> None:
    """Write any DeepSpeed-style state (nested dicts/lists of tensors and plain data)."""
    encoder = _Encoder()
    structure = encoder.encode(state)
    _atomic_save(encoder.tensors, Path(path), {STRUCTURE_KEY: json.dumps(structure)})


def load_state(path: str | os.PathLike, map_location: Any = None) -> Any:
    device = "cpu" if map_location is None or callable(map_location) else str(map_location)
    with safe_open(str(path), framework="pt", device=device) as handle:
        metadata = handle.metadata() or {}
        if STRUCTURE_KEY not in metadata:
            raise ValueError(f"{path} is not a dtvg_scale checkpoint file (no structure metadata)")
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    return _decode(json.loads(metadata[STRUCTURE_KEY]), tensors)


class SafetensorsCheckpointEngine(CheckpointEngine):
    """DeepSpeed checkpoint engine that reads and writes safetensors instead of pickle."""

    def __init__(self, config_params: Any = None) -> None:
        super().__init__(config_params)
        self.name = "SafetensorsCheckpointEngine"
        self.written: list[str] = []  # this rank's files since the caller last cleared it (the manifest's)

    def create(self, info: CheckpointCommitInfo) -> None:
        pass

    def save(self, state_dict: Any, path: str) -> None:
        save_state(state_dict, path)
        self.written.append(path)

    def load(self, path: str, map_location: Any = None) -> Any:
        return load_state(path, map_location)

    def commit(self, info: CheckpointCommitInfo) -> bool:
        return True

    def preserves_storage_sharing(self) -> bool:
        return False  # DeepSpeed then clones views, which safetensors needs


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None) -> None:
    """An artifact (prompt, task vector): named tensors plus JSON-able metadata, atomically."""
    plain = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    _atomic_save(plain, Path(path), meta)


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        meta = {k: json.loads(v) for k, v in (handle.metadata() or {}).items()}
        return {key: handle.get_tensor(key) for key in handle.keys()}, meta


# ---------------------------------------------------------------- complete checkpoints

MANIFEST = "manifest.json"
DAMAGED_PREFIX = "damaged-"


def _sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: str | os.PathLike, tag_dir: Path) -> dict[str, Any]:
    """What the manifest keeps of one written file."""
    return {"file": str(Path(path).resolve().relative_to(tag_dir.resolve())), "bytes": os.path.getsize(path),
            "sha256": _sha256(path)}


def write_manifest(tag_dir: Path, records: list[dict[str, Any]]) -> None:
    """Mark ``tag_dir`` complete: every rank's files are in ``records`` (call it once all have written)."""
    tmp = tag_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"files": sorted(records, key=lambda r: r["file"])}, indent=1) + "\n")
    os.replace(tmp, tag_dir / MANIFEST)


def tag_problem(tag_dir: Path) -> str | None:
    """None if every file of the tag's manifest is there with its size and hash; else what is
    wrong, naming the file."""
    manifest = tag_dir / MANIFEST
    if not manifest.is_file():
        return f"{tag_dir} is incomplete (no {MANIFEST}: the run stopped during this save)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as err:
        return f"{manifest} is unreadable ({type(err).__name__})"
    for record in files:
        path = tag_dir / record["file"]
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != record["bytes"]:
            return f"{path} has {size} bytes, its save wrote {record['bytes']} (cut short or overwritten)"
        if _sha256(path) != record["sha256"]:
            return f"{path} does not match the hash its save recorded (damaged)"
    return None


def checkpoint_tags(checkpoint_dir: Path) -> list[Path]:
    """The ``step<N>`` tag folders, oldest first."""
    tags = [p for p in checkpoint_dir.glob("step*") if p.is_dir() and p.name.removeprefix("step").isdigit()]
    return sorted(tags, key=lambda p: int(p.name.removeprefix("step")))


def trusted_tag(checkpoint_dir: Path) -> tuple[str | None, list[str]]:
    """(the newest complete tag or None, what is wrong with each newer one, newest first)."""
    problems = []
    for tag in reversed(checkpoint_tags(checkpoint_dir)):
        problem = tag_problem(tag)
        if problem is None:
            return tag.name, problems
        problems.append(problem)
    return None, problems


def set_aside(checkpoint_dir: Path, tag: str) -> None:
    """Keep a damaged tag for inspection, out of the way of the run's own tags."""
    target = checkpoint_dir / f"{DAMAGED_PREFIX}{tag}"
    if target.exists():
        shutil.rmtree(target)
    os.replace(checkpoint_dir / tag, target)
