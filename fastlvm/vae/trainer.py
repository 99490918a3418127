"""The training loop: Adam on the objective over shuffled batches, with validation, early
stopping, progress, checkpoints and torch.distributed.

What a step costs beyond the MLP's GEMMs is kept small: the batch is one ``index_select`` into a
preallocated buffer (in-memory data), the noise is written into a preallocated buffer, the loss
is one fused kernel, the statistics stay tensors until the end of the epoch, and Adam runs its
fused (or for-each) update. The order of an epoch is a pure function of (seed, epoch) and the
noise of a row a pure function of (seed, step, global row index), so a fit resumed from a
checkpoint, or run on several processes, takes the same steps as one uninterrupted process.

Multi-process: when a torch.distributed process group is initialised, the module is wrapped in
DistributedDataParallel; each rank takes a contiguous share of every global batch and scales its
loss by (its rows / global batch rows) * world size, so DDP's gradient average is the gradient
of the global batch's mean loss. Statistics and validation sums are all-reduced; only rank 0
writes checkpoints and prints.
"""

import contextlib
import copy
import gc
import math
import sys
import time

import torch

from fastlvm.vae import state as state_file
from fastlvm.vae.evaluate import negative_bound
from fastlvm.vae.model import RowNoise

CHECKPOINT_KIND = "fastlvm.VAE checkpoint"
CHECKPOINT_FORMAT = 1


def distributed():
    """(rank, world size, process group active)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


def _all_reduce(t):
    torch.distributed.all_reduce(t)
    return t


@contextlib.contextmanager
def _frozen_heap():
    """Moves the objects alive now (torch's, NumPy's, scikit-learn's ...) out of the garbage
    collector's reach for the loop: every step allocates enough Python objects to trigger
    collections, and each full one walked the whole heap of the imported libraries (a tenth of
    a batch-128 step's time in a profile). The loop's own garbage is still collected."""
    if gc.get_freeze_count():  # someone froze the heap already: leave their arrangement alone
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def make_optimizer(params, lr, device, dtype):
    """Adam with its fused update where this torch has one for the device and dtype."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):  # pragma: no cover - older torch or device
        return torch.optim.Adam(params, lr=lr, foreach=True)


class Trainer:
    """One fit's loop. ``run()`` returns when max_epochs are done or early stopping fires."""

    def __init__(self, module, data, cfg, seeds, identity, checkpoint=None, out=None):
        self.module, self.data, self.cfg, self.seeds = module, data, cfg, seeds
        self.identity, self.checkpoint = identity, checkpoint
        self.rank, self.world, self.ddp = distributed()
        self.out = out if out is not None else (lambda line: print(line, file=sys.stdout, flush=True))
        params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(params, cfg["lr"], cfg["device"], cfg["dtype"])
        self.epoch, self.step, self.history = 0, 0, []
        self.best_loss, self.best_epoch, self.best_state, self.no_improve = math.inf, 0, None, 0
        self.stopped = False
        self.rng_state = None

    # ------------------------------------------------------------------ checkpoints

    def resume(self):
        """Loads the checkpoint if its file exists (a different model's raises ValueError)."""
        import os

        if self.checkpoint is None or not os.path.exists(self.checkpoint):
            return False
        config, tensors = state_file.read(self.checkpoint, CHECKPOINT_KIND, "fastlvm.VAE checkpoint")
        if config.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{self.checkpoint!r} has checkpoint format {config.get('format')}, "
                             f"expected {CHECKPOINT_FORMAT}. Use another checkpoint path or delete the file.")
        for name, value in self.identity.items():
            saved = config["identity"].get(name)
            if saved != value:
                raise ValueError(f"checkpoint {self.checkpoint!r} was written by a different model: {name} = "
                                 f"{saved!r} there but {value!r} here. Use another checkpoint path or delete the "
                                 "file.")
        try:
            self.module.load_state_dict(state_file.load_state_dict("model/", tensors))
            state_file.load_optimizer("optim/", self.optimizer, tensors, config["param_groups"])
            best = state_file.load_state_dict("best/", tensors)
        except (RuntimeError, KeyError, ValueError) as e:
            raise ValueError(f"checkpoint {self.checkpoint!r} does not fit this model ({e}). Use another "
                             "checkpoint path or delete the file.") from None
        self.best_state = best or None
        self.epoch, self.step, self.history = config["epoch"], config["step"], config["history"]
        self.best_loss = config["best_loss"] if config["best_loss"] is not None else math.inf
        self.best_epoch, self.no_improve, self.stopped = config["best_epoch"], config["no_improve"], config["stopped"]
        self.rng_state = tensors["rng"]
        return True

    def _save_checkpoint(self):
        if self.checkpoint is None or self.rank != 0:
            return
        tensors = state_file.state_tensors("model/", self.module.state_dict())
        optim, groups = state_file.optimizer_tensors("optim/", self.optimizer)
        tensors.update(optim)
        if self.best_state is not None:
            tensors.update(state_file.state_tensors("best/", self.best_state))
        tensors["rng"] = torch.get_rng_state()
        config = {"format": CHECKPOINT_FORMAT, "identity": self.identity, "param_groups": groups,
                  "epoch": self.epoch, "step": self.step, "history": self.history,
                  "best_loss": None if math.isinf(self.best_loss) else self.best_loss,
                  "best_epoch": self.best_epoch, "no_improve": self.no_improve, "stopped": self.stopped}
        state_file.write(self.checkpoint, CHECKPOINT_KIND, config, tensors)

    # ------------------------------------------------------------------ the loop

    def run(self):
        cfg = self.cfg
        if self.rng_state is not None:
            torch.set_rng_state(self.rng_state)
        model = self.module
        if self.ddp:
            model = torch.nn.parallel.DistributedDataParallel(self.module)
        self.model = model
        bar = self._progress_bar()
        try:
            with _frozen_heap():
                while self.epoch < cfg["max_epochs"] and not self.stopped:
                    self._epoch(bar)
        finally:
            if bar is not None:
                bar.close()
        if cfg["early_stopping"] and self.best_state is not None:
            self.module.load_state_dict(self.best_state)

    def _progress_bar(self):
        if self.cfg["verbose"] < 2 or self.rank != 0:
            return None
        from tqdm.auto import tqdm

        total = self.cfg["max_epochs"] * self.cfg["steps_per_epoch"]
        return tqdm(total=total, initial=min(total, self.epoch * self.cfg["steps_per_epoch"]), unit="batch",
                    desc="VAE", leave=True)

    def _beta(self, step):
        """beta at (0-based) step: it rises linearly over kl_warmup epochs, reaching beta after them."""
        cfg = self.cfg
        if cfg["kl_warmup"] <= 0:
            return cfg["beta"]
        ramp = (step + 1) / (cfg["kl_warmup"] * cfg["steps_per_epoch"])
        return cfg["beta"] * min(1.0, ramp)

    def _epoch(self, bar):
        cfg, module, model, optimizer = self.cfg, self.module, self.model, self.optimizer
        L = cfg["n_samples"]
        seeds = self.seeds
        free_bits = cfg["free_bits"]
        reduce_kl = _all_reduce if (self.ddp and free_bits > 0) else None
        sums = torch.zeros(3, dtype=torch.float64)
        module.train()
        t0 = time.perf_counter()
        n_rows = 0
        for batch_index, (x, rows, global_rows) in enumerate(
                self.data.train_batches(seeds["shuffle"], self.epoch, cfg["batch_size"], self.rank, self.world)):
            n = rows.shape[0]
            noise = RowNoise(seeds["noise"], self.step, rows, L)
            scale = n * self.world / global_rows if self.world > 1 or n != global_rows else 1.0
            loss, stats = model(x, noise, self._beta(self.step), free_bits, scale, reduce_kl)
            if self.ddp:
                stats = _all_reduce(stats.to(torch.float64))
            value = float(stats[0]) if self.ddp else float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"the loss is not finite ({value}) at epoch {self.epoch + 1}, batch {batch_index + 1}; the "
                    "parameters of the last finished epoch are kept (lower lr, use float64, or check the data).")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums += stats
            n_rows += global_rows
            self.step += 1
            if bar is not None:
                bar.update(1)
        seconds = time.perf_counter() - t0
        self._finish_epoch(sums, n_rows, seconds, bar)

    def _finish_epoch(self, sums, n_rows, seconds, bar):
        cfg = self.cfg
        for p in self.module.parameters():
            if not bool(torch.isfinite(p).all()):
                raise FloatingPointError(
                    f"the parameters are not finite after epoch {self.epoch + 1}; the parameters of the last "
                    "finished epoch are kept (lower lr, use float64, or check the data).")
        loss, recon, kl = (float(v) / n_rows for v in sums)
        entry = {"epoch": self.epoch + 1, "loss": loss, "reconstruction": recon, "kl": kl,
                 "beta": self._beta(self.step - 1),
                 "seconds": seconds, "rows_per_s": n_rows / seconds if seconds > 0 else math.inf}
        if hasattr(self.module, "epoch_report"):  # a model's own entries (VQ-VAE: re-seeded codes)
            entry.update(self.module.epoch_report())
        monitored = loss
        if cfg["has_validation"]:
            v_loss, v_recon, v_kl = self.validate()
            if not math.isfinite(v_loss):
                raise FloatingPointError(
                    f"the validation loss is not finite ({v_loss}) after epoch {self.epoch + 1}; the estimator "
                    "keeps its previous state and the checkpoint its last finished epoch.")
            entry.update(val_loss=v_loss, val_reconstruction=v_recon, val_kl=v_kl)
            monitored = v_loss
        self.epoch += 1
        self.history.append(entry)
        if monitored < self.best_loss:
            self.best_loss, self.best_epoch, self.no_improve = monitored, self.epoch, 0
            if cfg["early_stopping"]:
                self.best_state = copy.deepcopy(self.module.state_dict())
        else:
            self.no_improve += 1
            if cfg["early_stopping"] and self.no_improve >= cfg["n_iter_no_change"]:
                self.stopped = True
        self._save_checkpoint()
        self._report(entry, bar)

    def validate(self):
        """Mean (negative bound, -E log p(x|z), KL) over the held-out rows (beta = 1)."""
        module = self.module
        module.eval()
        sums = torch.zeros(3, dtype=torch.float64)
        count = 0
        with torch.no_grad():
            for x, rows in self.data.blocks("held", self.cfg["eval_rows"]):
                lo, hi = (x.shape[0] * self.rank // self.world, x.shape[0] * (self.rank + 1) // self.world)
                if hi <= lo:
                    continue
                terms = negative_bound(module, x[lo:hi], rows[lo:hi], self.seeds["eval"], self.cfg["n_samples"])
                sums += torch.stack([t.sum().to(torch.float64).cpu() for t in terms])
                count += hi - lo
        module.train()
        if self.ddp:
            both = _all_reduce(torch.cat((sums, torch.tensor([float(count)], dtype=torch.float64))))
            sums, count = both[:3], float(both[3])
        return tuple(float(v) / count for v in sums)

    def _report(self, entry, bar):
        if self.rank != 0 or self.cfg["verbose"] < 1:
            return
        text = (f"loss {entry['loss']:.4f} (recon {entry['reconstruction']:.4f}, KL {entry['kl']:.4f})")
        if "val_loss" in entry:
            text += f", validation {entry['val_loss']:.4f}"
        if bar is not None:
            bar.set_postfix_str(f"epoch {entry['epoch']}: {text}")
            return
        self.out(f"epoch {entry['epoch']:>4}: {text}, {entry['seconds']:.2f} s, {entry['rows_per_s']:,.0f} rows/s")
