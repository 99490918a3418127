"""Model and checkpoint files: one ``.npz`` of plain arrays holding a JSON config and the tensors,
loaded with ``allow_pickle=False`` (nothing is unpickled), written to a temporary file that is
flushed and renamed over the path, so a reader sees the old file or the new one, never half.
"""

import json
import os
import tempfile
import zipfile

import numpy as np
import torch

_CONFIG = "__config__"


def atomic_savez(path, arrays):
    """np.savez to a temporary file in the same directory, flushed to disk, then renamed."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _array(t):
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().numpy()
    return np.asarray(t)


def write(path, kind, config, tensors):
    """Writes {name: tensor or array} and the JSON-able config (tagged with ``kind``) to path."""
    text = json.dumps({"kind": kind, **config}, sort_keys=True)
    arrays = {name: _array(t) for name, t in tensors.items()}
    arrays[_CONFIG] = np.array(text)
    atomic_savez(os.fspath(path), arrays)


def read(path, kind, what="fastlvm file"):
    """(config, {name: torch tensor}) of a file written by ``write`` with this ``kind``; any damage
    or another kind of file raises ValueError (the file is only read)."""
    path = os.fspath(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        config = json.loads(str(arrays.pop(_CONFIG)))
        if not isinstance(config, dict):
            raise ValueError("the config is not a JSON object")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, json.JSONDecodeError) as e:
        raise ValueError(f"{path!r} is not a readable {what} ({type(e).__name__}: {e}).") from None
    if config.get("kind") != kind:
        raise ValueError(f"{path!r} is not a {what}: it holds {config.get('kind')!r}, expected {kind!r}.")
    return config, {k: torch.from_numpy(v) for k, v in arrays.items()}


def state_tensors(prefix, state_dict):
    return {f"{prefix}{k}": v for k, v in state_dict.items()}


def load_state_dict(prefix, tensors):
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def optimizer_tensors(prefix, optimizer):
    """An optimiser's state as named tensors plus its JSON-able param groups."""
    sd = optimizer.state_dict()
    tensors = {}
    for index, state in sd["state"].items():
        for name, value in state.items():
            tensors[f"{prefix}{index}/{name}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    return tensors, sd["param_groups"]


def load_optimizer(prefix, optimizer, tensors, param_groups):
    state = {}
    for key, value in tensors.items():
        if key.startswith(prefix):
            index, name = key[len(prefix):].split("/", 1)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})
