"""A training state on disk without pickle: its tensors in `state.safetensors`, everything else (step,
config, optimizer hyper-parameters, scheduler state, RNG states) in `state.json`.

Loading reads a safetensors file (a JSON header and raw bytes) and a JSON document, so nothing in a
checkpoint can run code, whoever wrote the bucket it came from (README, "Security"). A directory that
holds a pickle instead (the `state.pt` of earlier tdm versions) is refused with a CheckpointFormatError, and
is never unpickled.

The JSON tree encodes what JSON cannot hold directly:
    {"$tensor": key}                 a torch tensor, stored in state.safetensors under `key`
    {"$ndarray": key, "dtype": d}    a numpy array (stored as a tensor; numpy's RNG state is one)
    {"$tuple": [...]}                a tuple
    {"$dict": [[key, value], ...]}   a dict whose keys are not all strings (optimizer state: int keys)
Pure: torch, numpy and safetensors only. `check_checkpoint_dir` inspects a directory's file names on any
pyarrow filesystem (local or S3) without reading the state.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import InputError

TENSORS_FILE = "state.safetensors"
TREE_FILE = "state.json"
LEGACY_PICKLE_FILE = "state.pt"


class CheckpointFormatError(InputError):
    """A checkpoint that tdm will not read: a pickle, or files that are not what they claim to be."""


def _encode(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(obj, torch.Tensor):
        key = path or "tensor"
        # a copy on the CPU: safetensors refuses tensors that share storage (tied or viewed weights)
        tensors[key] = obj.detach().to("cpu", copy=True).contiguous()
        return {"$tensor": key}
    if isinstance(obj, np.ndarray):
        key = path or "array"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj).astype(np.int64 if obj.dtype.kind in "iub"
                                                                         else np.float64))
        return {"$ndarray": key, "dtype": obj.dtype.str}
    if isinstance(obj, (bool, int, float, str)) or obj is None:
        return obj
    if isinstance(obj, np.generic):          # a numpy scalar, e.g. inside RNG state
        return obj.item()
    if isinstance(obj, tuple):
        return {"$tuple": [_encode(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: _encode(v, tensors, f"{path}/{k}") for k, v in obj.items()}
        return {"$dict": [[_encode(k, tensors, f"{path}/key{i}"), _encode(v, tensors, f"{path}/{i}")]
                          for i, (k, v) in enumerate(obj.items())]}
    raise TypeError(f"{path or 'state'}: a {type(obj).__name__} cannot be stored without pickle")


def _decode(tree: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(tree, list):
        return [_decode(v, tensors, where) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if "$tensor" in tree or "$ndarray" in tree:
        key = tree.get("$tensor", tree.get("$ndarray"))
        if key not in tensors:
            raise CheckpointFormatError(f"{where}: {TREE_FILE} names tensor {key!r}, which {TENSORS_FILE} lacks")
        if "$tensor" in tree:
            return tensors[key]
        return tensors[key].numpy().astype(np.dtype(tree["dtype"]))
    if "$tuple" in tree:
        return tuple(_decode(v, tensors, where) for v in tree["$tuple"])
    if "$dict" in tree:
        return {_hashable(_decode(k, tensors, where)): _decode(v, tensors, where) for k, v in tree["$dict"]}
    return {k: _decode(v, tensors, where) for k, v in tree.items()}


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


def save_state(directory: str | Path, state: dict) -> None:
    """Write `state` (nested dicts, lists and tuples of tensors, arrays and JSON values) into `directory`."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, tensors, "")
    directory = Path(directory)
    save_file(tensors, str(directory / TENSORS_FILE))
    (directory / TREE_FILE).write_text(json.dumps(tree), encoding="utf-8")


def load_state(directory: str | Path) -> dict:
    """The state `save_state` wrote; CheckpointFormatError for a pickle checkpoint or damaged files."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    tree_file, tensors_file = directory / TREE_FILE, directory / TENSORS_FILE
    if not tree_file.is_file():
        if (directory / LEGACY_PICKLE_FILE).exists():
            raise CheckpointFormatError(
                f"{directory}: {LEGACY_PICKLE_FILE} is a pickle checkpoint (written by an earlier tdm); tdm does not "
                "unpickle checkpoints, since a pickle can run code when loaded. Nothing in it was read or run; "
                "start a new run (a new --run_name) or resume from a checkpoint written by this version")
        raise CheckpointFormatError(f"{directory}: not a tdm checkpoint (no {TREE_FILE})")
    try:
        tree = json.loads(tree_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointFormatError(f"{tree_file}: not valid JSON ({e})") from None
    try:
        tensors = load_file(str(tensors_file)) if tensors_file.is_file() else {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointFormatError(f"{tensors_file}: not a safetensors file ({e})") from None
    state = _decode(tree, tensors, str(directory))
    if not isinstance(state, dict):
        raise CheckpointFormatError(f"{tree_file}: holds a {type(state).__name__}, not a training state")
    return state


def check_checkpoint_dir(fs, path: str, what: str) -> None:
    """Refuse, before anything is loaded, a checkpoint directory on pyarrow filesystem `fs` that holds a
    pickle and no pickle-free state; `what` names the input in the error (e.g. "--checkpoint")."""
    import pyarrow.fs

    def exists(name: str) -> bool:
        return fs.get_file_info(f"{path}/{name}").type != pyarrow.fs.FileType.NotFound

    if not exists(TREE_FILE) and exists(LEGACY_PICKLE_FILE):
        raise CheckpointFormatError(f"{what}: {path} holds a pickle checkpoint ({LEGACY_PICKLE_FILE}, written by an "
                                    "earlier tdm); tdm does not unpickle checkpoints, since a pickle can run code. "
                                    "Nothing was read; start a new run (a new --name)")
