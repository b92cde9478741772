"""Training checkpoints that hold data only: tensors in safetensors, everything else in JSON.

A checkpoint is two files in the output directory, written as one unit:

- ``checkpoint-<sha16>.safetensors``: every tensor of the training state (model weights and buffers,
  Adam's moment tensors, the dead-latent counters), named by the first 16 hex digits of its sha256;
- ``checkpoint.json`` (:data:`CHECKPOINT`): the step, the validation history, the train and model
  configs, Adam's scalar state and hyper-parameters, and the tensors file's name and full sha256.

The JSON is written last, atomically: it is the commit point. A write killed at any moment leaves the
previous checkpoint whole (its tensors file is deleted only after the new JSON is in place), and what
the killed write left behind (temporary files, a tensors file no JSON names) is removed by the next
run. Nothing read here can run code: a legacy pickle ``checkpoint.pt``, a JSON file that does not
parse, a missing, truncated or altered tensors file are refused with a :class:`CheckpointError`
naming the file and the fix. Tensors are returned on the CPU, bit for bit as they were saved.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError
from .fileio import atomic_write, file_sha256, fsync_file, tmp_name

CHECKPOINT = "checkpoint.json"  # the commit record: a checkpoint exists when this file does
LEGACY = "checkpoint.pt"  # the pickle format of earlier versions: never loaded
FORMAT, VERSION = "crossdiff-checkpoint", 1
_TENSORS_RE = re.compile(r"checkpoint-[0-9a-f]{16}\.safetensors")
_TEMP_PREFIX = ".checkpoint"  # fileio.tmp_name's temporaries of both files start so
_OPT = "opt"  # the state key of the optimizer's state_dict


def _fix(out: Path) -> str:
    return (f"delete {out / CHECKPOINT} and {out}/checkpoint-*.safetensors (and any {LEGACY}) to start "
            "training over, or use another --out")


def _refuse(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: {problem}; crossdiff never loads it. {_fix(path.parent)}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- the state as tensors + JSON --------------------------------------------------------------------
def _scalar(t: torch.Tensor) -> dict:
    return {"scalar": t.item(), "dtype": str(t.dtype).removeprefix("torch.")}


def _from_scalar(d: dict) -> torch.Tensor:
    dtype = getattr(torch, str(d["dtype"]), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{d['dtype']!r} is not a torch dtype")
    return torch.tensor(d["scalar"], dtype=dtype)


def _pack_optimizer(sd: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """Adam's ``state_dict``: moment tensors into ``tensors`` as ``opt/<param>/<name>``; 0-dim tensors
    (the step counts) as ``{"scalar", "dtype"}`` (a float32 or int value survives JSON exactly)."""
    state = {}
    for idx, entries in sd["state"].items():
        js = {}
        for name, v in entries.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                tensors[f"{_OPT}/{idx}/{name}"] = v
            else:
                js[name] = _scalar(v) if isinstance(v, torch.Tensor) else v
        state[str(idx)] = js
    return {"state": state, "param_groups": sd["param_groups"]}


def _unpack_optimizer(js: dict, tensors: dict[str, torch.Tensor]) -> dict:
    state = {}
    for idx, entries in js["state"].items():
        state[int(idx)] = {n: _from_scalar(v) if isinstance(v, dict) and "scalar" in v else v
                           for n, v in entries.items()}
    for key, t in tensors.items():
        if key.startswith(f"{_OPT}/"):
            _, idx, name = key.split("/", 2)
            state.setdefault(int(idx), {})[name] = t
    return {"state": state, "param_groups": js["param_groups"]}


def pack(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split a training state into (tensors, JSON document). ``state[opt]`` is an optimizer state_dict;
    any other value is a tensor, a non-empty dict of tensors (a module's state_dict), or JSON data."""
    tensors: dict[str, torch.Tensor] = {}
    doc: dict[str, Any] = {"tensor_keys": [], "tensor_dicts": []}
    for key, v in state.items():
        if key == _OPT:
            doc[key] = _pack_optimizer(v, tensors)
        elif isinstance(v, torch.Tensor):
            tensors[key] = v
            doc["tensor_keys"].append(key)
        elif isinstance(v, dict) and v and all(isinstance(t, torch.Tensor) for t in v.values()):
            tensors.update({f"{key}/{name}": t for name, t in v.items()})
            doc["tensor_dicts"].append(key)
        else:
            doc[key] = v
    tensors = {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}
    return tensors, doc


def unpack(tensors: dict[str, torch.Tensor], doc: dict) -> dict:
    """The inverse of :func:`pack`."""
    state = {k: v for k, v in doc.items() if k not in ("tensor_keys", "tensor_dicts", _OPT)}
    for key in doc["tensor_keys"]:
        state[key] = tensors[key]
    for key in doc["tensor_dicts"]:
        state[key] = {k.split("/", 1)[1]: t for k, t in tensors.items() if k.startswith(f"{key}/")}
    if _OPT in doc:
        state[_OPT] = _unpack_optimizer(doc[_OPT], tensors)
    return state


# ---- files ---------------------------------------------------------------------------------------
def write_checkpoint(out_dir: str | os.PathLike, state: dict) -> Path:
    """Write ``state`` (see :func:`pack`) as the checkpoint of ``out_dir``; returns the JSON's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors, doc = pack(state)
    tmp = tmp_name(out / "checkpoint.safetensors")
    try:
        save_file(tensors, str(tmp))
        fsync_file(tmp)
        sha = file_sha256(tmp)
        name = f"checkpoint-{sha[:16]}.safetensors"
        os.replace(tmp, out / name)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(out)
    # NaN stays NaN (Python's JSON reads it back), so a resumed history equals an uninterrupted one
    text = json.dumps({"format": FORMAT, "version": VERSION, "tensors": name, "sha256": sha, **doc},
                      indent=1) + "\n"
    atomic_write(out / CHECKPOINT, lambda p: Path(p).write_text(text), fsync=True)
    _fsync_dir(out)
    for old in out.glob("checkpoint-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return out / CHECKPOINT


def _regular(path: Path) -> bool:
    """Whether ``path`` is a regular file (a FIFO or device is never opened: reading it could hang)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _read_doc(path: Path) -> dict:
    if not _regular(path):
        raise _refuse(path, "is not a regular file")
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise _refuse(path, f"is not a readable checkpoint record ({err})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise _refuse(path, f"is not a crossdiff checkpoint record (no \"format\": \"{FORMAT}\")")
    if doc.get("version") != VERSION:
        raise _refuse(path, f"has checkpoint format version {doc.get('version')!r}; this crossdiff reads {VERSION}")
    name = doc.get("tensors")
    if not isinstance(name, str) or not _TENSORS_RE.fullmatch(name) or not isinstance(doc.get("sha256"), str):
        raise _refuse(path, f"names the tensors file {name!r}, not checkpoint-<16 hex>.safetensors in its directory")
    return doc


def remove_partial(out_dir: str | os.PathLike) -> list[Path]:
    """Delete what a killed checkpoint write left in ``out_dir``: temporaries and any tensors file the
    checkpoint record does not name (all of them when there is no record). Returns what was removed."""
    out = Path(out_dir)
    keep = None
    if _regular(out / CHECKPOINT):
        try:
            keep = _read_doc(out / CHECKPOINT)["tensors"]
        except CheckpointError:
            return []  # a foreign record: touch nothing; reading it refuses with the fix
    gone = [p for p in out.glob(f"{_TEMP_PREFIX}*.tmp-*") if _regular(p)]
    gone += [p for p in out.glob("checkpoint-*.safetensors") if p.name != keep and _regular(p)]
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


def read_checkpoint(out_dir: str | os.PathLike) -> dict | None:
    """The training state saved in ``out_dir`` (as given to :func:`write_checkpoint`, tensors on the
    CPU), or None when there is none. Raises :class:`CheckpointError` on anything else found there."""
    out = Path(out_dir)
    legacy = out / LEGACY
    if legacy.exists() or legacy.is_symlink():
        raise _refuse(legacy, "is a pickle checkpoint (an old crossdiff format, or a file from elsewhere): "
                              "unpickling can run arbitrary code")
    path = out / CHECKPOINT
    if not (path.exists() or path.is_symlink()):
        return None
    doc = _read_doc(path)
    tpath = out / doc["tensors"]
    if not _regular(tpath):
        raise _refuse(path, f"names {tpath.name}, which is missing or not a regular file")
    if file_sha256(tpath) != doc["sha256"]:
        raise _refuse(tpath, f"does not match the sha256 recorded in {CHECKPOINT} (truncated or altered)")
    try:
        tensors = load_file(str(tpath), device="cpu")
        return unpack(tensors, {k: v for k, v in doc.items() if k not in ("format", "version", "tensors", "sha256")})
    except (SafetensorError, KeyError, ValueError, TypeError, AttributeError, OSError) as err:
        raise _refuse(tpath, f"is not a readable checkpoint ({type(err).__name__}: {err})") from None


def remove_checkpoint(out_dir: str | os.PathLike) -> None:
    """Delete the checkpoint of ``out_dir`` (record first, so no half checkpoint is ever seen)."""
    out = Path(out_dir)
    (out / CHECKPOINT).unlink(missing_ok=True)
    remove_partial(out)


def settings_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``"name: old -> new"`` for each key of ``new`` whose value in ``old`` differs (nested settings
    as ``section.name``; compared as JSON, so a tuple equals the list it was saved as); a key ``old``
    lacks reads ``(absent)``."""
    def norm(v):
        return json.loads(json.dumps(v, default=str))

    out = []
    for k, v in new.items():
        if k not in old:
            out.append(f"{prefix}{k}: (absent) -> {v!r}")
        elif isinstance(v, dict) and isinstance(old[k], dict):
            out += settings_differences(old[k], v, prefix=f"{prefix}{k}.")
        elif norm(old[k]) != norm(v):
            out.append(f"{prefix}{k}: {old[k]!r} -> {v!r}")
    return out
