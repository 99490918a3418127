"""Checkpoints of an EM fit: one .npz file of plain arrays (loaded without pickle), replaced
atomically after every iteration, so a process killed at any moment leaves the previous or the
new checkpoint, never a broken one.

A checkpoint holds the model's identity (so that one written by another model is refused), the
initialisation in progress and the random state right after it was drawn, that run's parameters,
iteration count, lower bound and history, and the best finished run of earlier initialisations.
"""

import os
import zipfile
from typing import NamedTuple

import numpy as np

from fastlvm.data.files import atomic_savez
from fastlvm.mixture.em import Run

FORMAT = 1
_PARAMS = ("weights", "means", "covariances", "precisions_cholesky")


class Resumed(NamedTuple):
    """What a checkpoint holds: the initialisation in progress, the random state right after its
    parameters were drawn, its run so far, and the best finished run of earlier ones (or None)."""

    init: int
    rng_state: tuple
    run: Run
    best: object


def _pack_run(prefix, run):
    out = {f"{prefix}{name}": np.asarray(a, dtype=np.float64) for name, a in zip(_PARAMS, run.params)}
    out.update({f"{prefix}lower_bound": np.float64(run.objective), f"{prefix}n_iter": np.int64(run.n_iter),
                f"{prefix}converged": np.bool_(run.converged),
                f"{prefix}lower_bounds": np.asarray(run.history, dtype=np.float64).reshape(-1)})
    return out


def _unpack_run(prefix, z, params_type):
    params = params_type(*(z[f"{prefix}{name}"] for name in _PARAMS))
    return Run(params, float(z[f"{prefix}lower_bound"]), int(z[f"{prefix}n_iter"]), bool(z[f"{prefix}converged"]),
               tuple(float(v) for v in z[f"{prefix}lower_bounds"]))


class Checkpoint:
    """The checkpoint file of one model; `identity` (name -> value) must match to resume.
    params_type builds a run's parameters from its four arrays (weights, means, covariances,
    precisions_cholesky)."""

    def __init__(self, path, params_type, **identity):
        self.path = os.fspath(path)
        self.params_type = params_type
        self.identity = identity

    def load(self):
        """A Resumed record, or None without a file."""
        if not os.path.exists(self.path):
            return None
        try:
            with np.load(self.path, allow_pickle=False) as z:
                z = {k: z[k] for k in z.files}
            if int(z["format"]) != FORMAT:
                raise ValueError(f"format {int(z['format'])}, expected {FORMAT}")
            for name, value in self.identity.items():
                saved = z[name].item()
                if saved != value:
                    raise _Mismatch(f"checkpoint {self.path!r} was written by a different model: {name} = {saved!r} "
                                    f"there but {value!r} here. Use another checkpoint path or delete the file.")
            rng_state = ("MT19937", z["rng_keys"], int(z["rng_pos"]), int(z["rng_has_gauss"]),
                         float(z["rng_cached_gaussian"]))
            best = _unpack_run("best_", z, self.params_type) if "best_n_iter" in z else None
            return Resumed(int(z["init"]), rng_state, _unpack_run("", z, self.params_type), best)
        except _Mismatch as e:
            raise ValueError(str(e)) from None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"{self.path!r} is not a readable fastlvm checkpoint ({type(e).__name__}: {e}). "
                             "Use another checkpoint path or delete the file.") from e

    def save(self, init, rng_state, run, best):
        _, keys, pos, has_gauss, cached = rng_state
        arrays = {"format": np.int64(FORMAT), "init": np.int64(init), "rng_keys": np.asarray(keys),
                  "rng_pos": np.int64(pos), "rng_has_gauss": np.int64(has_gauss),
                  "rng_cached_gaussian": np.float64(cached)}
        arrays.update({name: np.asarray(value) for name, value in self.identity.items()})
        arrays.update(_pack_run("", run))
        if best is not None:
            arrays.update(_pack_run("best_", best))
        atomic_savez(self.path, arrays)


class _Mismatch(Exception):
    pass
