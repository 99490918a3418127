"""Fitting a VAE: seconds per epoch of one MLP VAE, fastlvm.VAE beside its peers, in one run.

The model (every contender): Dx=784 -> 512 -> 256 -> 2 x Dz encoder, Dz=32 -> 256 -> 512 -> 784
decoder, ReLU between layers, Bernoulli likelihood on the decoder's logits, N(0, I) prior,
one-sample ELBO, Adam(lr=1e-3), float32, 2 threads, the same 20,000 training rows; batch 128
and batch 1024. Contenders:

  idiomatic      TensorDataset + DataLoader(shuffle=True), loss from torch.distributions
  torch.compile  the same loop with torch.compile on the encoder and the decoder
  pythae         pythae 0.1.2's VAE and BaseTrainer.train_step (its DataLoader over a per-row
                 Dataset, its loss), the same encoder and decoder; its tqdm bar is left out
  tight loop     no DataLoader: batches are index slices of a shuffled permutation,
                 loss in closed form (binary_cross_entropy_with_logits, analytic KL)
  tight+fused    the tight loop with fastlvm.functional's reparameterize + negative_elbo
  fastlvm.VAE    fastlvm.VAE(latent_dim=32, hidden=(512, 256), ...).fit, one epoch a round

Timing: the contenders of a batch size run one epoch each per round, round after round, in an
order rotated every round, so that a shared machine's background load hits them alike. Round 1
is warm-up (torch.compile compiles there; allocations and page faults settle) and is not timed;
s/epoch is the median of the later rounds. Every contender thus trains --epochs epochs, and the
held-out scores after them are comparable.

The limit: an epoch is GEMM-bound. Each Linear layer costs 2 in.out FLOP per row forward and 4
backward (gradient of its input and of its weight), so FLOP per row = 6 * sum(in.out) over the
encoder's and decoder's layers: 6.54 MFLOP per row, as the issue counts it. Biases, activations
and the objective are not counted; the first layer's input gradient (2 * 784 * 512 FLOP per
row, 12% of the total), which no one computes, is. Rates are given as a fraction of this machine's large-GEMM float32 rate measured by
bench/machine.py (numpy's BLAS, 4096^3; torch's own rate on the same product is printed beside).

Held-out: every contender's model is scored by the same plain PyTorch code on the same
held-out rows: the one-sample-per-draw ELBO averaged over S draws and the importance-weighted
log p(x) from the same S draws (Burda et al., 2016), in nats per row.

score_samples: fastlvm.VAE.score_samples(X, n_samples=1000) in rows/s against a plain PyTorch
loop over the 1000 samples (each sample decodes all rows in one batch), on the same model.

Data: scikit-learn's digits (shipped with it, no download), each 8x8 image upsampled to 24x24,
placed at a random offset in a 28x28 frame and binarised by a Bernoulli draw of its intensity;
training rows come from images 0-1499, held-out rows from images 1500-1796.

Length of a default run: 6 contenders x 4 epochs x 2 batch sizes, two torch.compile warm-ups,
12 held-out scorings (1,000 rows x 100 draws) and two rounds of the score_samples race (256 rows x
1,000 draws): by the per-epoch times of the issue's reference machine about 3 to 4 minutes when
the machine is idle. A loaded machine stretches it many times over (each multi-threaded op waits
for both of its threads); --epochs 2 or --rows 5000 shorten it, --quick is a smoke run.

    python bench/bench_vae_fit.py [--quick] [--epochs 4] [--batches 128,1024] [--machine FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as tF
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
DX, HIDDEN, DZ = 784, (512, 256), 32
LR = 1e-3
SEED = 0
ENC_SIZES = (DX, *HIDDEN, 2 * DZ)
DEC_SIZES = (DZ, *reversed(HIDDEN), DX)
FLOP_PER_ROW = 6 * sum(a * b for sizes in (ENC_SIZES, DEC_SIZES) for a, b in zip(sizes, sizes[1:]))


# ----------------------------------------------------------------------------- data and model


def make_data(n_train, n_test, seed=SEED):
    """Binarised 28x28 digits: (n_train, 784) and (n_test, 784) float32 tensors of 0 and 1."""
    from sklearn.datasets import load_digits

    images = torch.from_numpy(load_digits().images.astype(np.float32) / 16.0)  # (1797, 8, 8) in [0, 1]
    big = tF.interpolate(images[:, None], size=(24, 24), mode="bilinear", align_corners=False)[:, 0]
    g = torch.Generator().manual_seed(seed)

    def draw(n, first, last):
        which = torch.randint(first, last, (n,), generator=g)
        dy, dx = torch.randint(0, 5, (2, n), generator=g)
        frame = torch.zeros(n, 28, 28)
        for oy in range(5):  # place each image at its offset, one offset pair at a time
            for ox in range(5):
                rows = ((dy == oy) & (dx == ox)).nonzero()[:, 0]
                frame[rows, oy:oy + 24, ox:ox + 24] = big[which[rows]]
        return torch.bernoulli(frame.clamp(0, 1), generator=g).reshape(n, DX)

    return draw(n_train, 0, 1500), draw(n_test, 1500, len(images))


def mlp(sizes):
    layers = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def make_modules(seed):
    """Encoder (x -> [mu, logvar]) and decoder (z -> logits), the same initial weights per seed."""
    torch.manual_seed(seed)
    return mlp(ENC_SIZES), mlp(DEC_SIZES)


# ----------------------------------------------------------------------------- contenders
# Each has .epoch() (one pass over the training rows) and .encode(x) -> (mu, logvar),
# .logits(z) -> decoder logits for the held-out scores.


class TorchModel:
    def __init__(self, seed):
        self.enc, self.dec = make_modules(seed)
        self.opt = torch.optim.Adam([*self.enc.parameters(), *self.dec.parameters()], lr=LR)

    def encode(self, x):
        return self.enc(x).chunk(2, dim=-1)

    def logits(self, z):
        return self.dec(z)

    def step(self, loss):
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


class Idiomatic(TorchModel):
    """What the tutorials write: a DataLoader over a TensorDataset, torch.distributions."""

    def __init__(self, X, batch, seed, compiled=False):
        from torch.utils.data import DataLoader, TensorDataset

        super().__init__(seed)
        gen = torch.Generator().manual_seed(seed)
        self.loader = DataLoader(TensorDataset(X), batch_size=batch, shuffle=True, generator=gen)
        self.fenc = torch.compile(self.enc) if compiled else self.enc
        self.fdec = torch.compile(self.dec) if compiled else self.dec

    def epoch(self):
        from torch.distributions import Bernoulli, Normal, kl_divergence

        for (x,) in self.loader:
            mu, logvar = self.fenc(x).chunk(2, dim=-1)
            q = Normal(mu, torch.exp(0.5 * logvar))
            z = q.rsample()
            rec = Bernoulli(logits=self.fdec(z)).log_prob(x).sum(-1)
            kl = kl_divergence(q, Normal(torch.zeros_like(mu), torch.ones_like(mu))).sum(-1)
            self.step((kl - rec).mean())


class Tight(TorchModel):
    """No DataLoader: index slices of a shuffled permutation; closed-form loss or fastlvm's fused one."""

    def __init__(self, X, batch, seed, fused=False):
        super().__init__(seed)
        self.X, self.batch, self.fused = X, batch, fused
        self.gen = torch.Generator().manual_seed(seed)

    def epoch(self):
        import fastlvm.functional as F

        order = torch.randperm(len(self.X), generator=self.gen)
        for start in range(0, len(self.X), self.batch):
            x = self.X[order[start:start + self.batch]]
            mu, logvar = self.enc(x).chunk(2, dim=-1)
            if self.fused:
                z, kl = F.reparameterize(mu, logvar)
                loss = F.negative_elbo(x, kl, logits=self.dec(z))
            else:
                z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
                rec = tF.binary_cross_entropy_with_logits(self.dec(z), x, reduction="none").sum(-1)
                kl = 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).sum(-1)
                loss = (kl + rec).mean()
            self.step(loss)


class Pythae:
    """pythae's VAE and BaseTrainer; one round runs its train_step (one epoch)."""

    def __init__(self, X, batch, seed, workdir):
        from pythae.data.datasets import BaseDataset
        from pythae.models import VAE, VAEConfig
        from pythae.models.base.base_utils import ModelOutput
        from pythae.models.nn import BaseDecoder, BaseEncoder
        from pythae.trainers import BaseTrainer, BaseTrainerConfig
        from pythae.trainers.training_callbacks import ProgressBarCallback

        logging.getLogger(BaseTrainer.__module__).setLevel(logging.WARNING)

        enc, dec = make_modules(seed)

        class Encoder(BaseEncoder):
            def __init__(self):
                super().__init__()
                self.net = enc

            def forward(self, x):
                mu, logvar = self.net(x.reshape(len(x), -1)).chunk(2, dim=-1)
                return ModelOutput(embedding=mu, log_covariance=logvar)

        class Decoder(BaseDecoder):
            def __init__(self):
                super().__init__()
                self.net = dec

            def forward(self, z):  # pythae's "bce" loss takes probabilities
                return ModelOutput(reconstruction=torch.sigmoid(self.net(z)))

        self.enc, self.dec = enc, dec
        config = VAEConfig(input_dim=(DX,), latent_dim=DZ, reconstruction_loss="bce")
        self.model = VAE(config, encoder=Encoder(), decoder=Decoder())
        trainer_config = BaseTrainerConfig(
            output_dir=workdir, num_epochs=10**6, learning_rate=LR, optimizer_cls="Adam",
            per_device_train_batch_size=batch, per_device_eval_batch_size=batch,
            train_dataloader_num_workers=0, steps_saving=None, seed=seed, no_cuda=True)
        dataset = BaseDataset(X, torch.zeros(len(X)))  # what pythae's TrainingPipeline builds
        self.trainer = BaseTrainer(model=self.model, train_dataset=dataset, training_config=trainer_config)
        prepare = type(self.trainer).prepare_training  # a property in 0.1.2: reading it prepares
        prepare.fget(self.trainer) if isinstance(prepare, property) else prepare(self.trainer)
        handler = self.trainer.callback_handler  # its tqdm bar per epoch would flood the report
        handler.callbacks = [c for c in handler.callbacks if not isinstance(c, ProgressBarCallback)]
        self.n_epoch = 0

    def encode(self, x):
        return self.enc(x).chunk(2, dim=-1)

    def logits(self, z):
        return self.dec(z)

    def epoch(self):
        self.n_epoch += 1
        self.model.train()
        self.trainer.train_step(self.n_epoch)


class FastlvmVAE:
    """fastlvm.VAE.fit; each round continues the fit by one epoch through its checkpoint.

    Its epoch time is the trainer's own (``history_[-1]["seconds"]``: the loop over the batches,
    as timed for the peers); what each resumed ``fit`` call adds around it (checking the data,
    reading and writing the checkpoint, the closing KL pass) is a per-fit cost, reported apart."""

    def __init__(self, X, batch, seed, workdir):
        import fastlvm

        self.X = X
        self.vae = fastlvm.VAE(latent_dim=DZ, hidden=HIDDEN, likelihood="bernoulli", batch_size=batch,
                               max_epochs=0, lr=LR, validation_fraction=0.0, early_stopping=False,
                               random_state=seed, dtype="float32",
                               checkpoint=os.path.join(workdir, "fastlvm-vae.ckpt"))
        self.call_overhead = []

    def epoch(self):
        self.vae.set_params(max_epochs=self.vae.max_epochs + 1)
        t0 = time.perf_counter()
        self.vae.fit(self.X)
        inner = self.vae.history_[-1]["seconds"]
        self.call_overhead.append(time.perf_counter() - t0 - inner)
        return inner

    def encode(self, x):
        return self.vae.model_.encode(x)

    def logits(self, z):
        return self.vae.model_.decoder(z)


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def heldout(model, X, n_samples, sample_chunk=20):
    """(mean ELBO, mean importance-weighted log p(x)) per row, from the same n_samples draws."""
    gen = torch.Generator().manual_seed(1234)
    mu, logvar = (t.float() for t in model.encode(X))
    sigma = torch.exp(0.5 * logvar)
    log_w = []
    for s in range(0, n_samples, sample_chunk):
        eps = torch.randn(min(sample_chunk, n_samples - s), *mu.shape, generator=gen)
        z = mu + sigma * eps
        log_px_z = -tF.binary_cross_entropy_with_logits(model.logits(z), X.expand(len(z), *X.shape),
                                                        reduction="none").sum(-1)
        log_pz_over_qz = (-0.5 * z.square() + 0.5 * eps.square() + 0.5 * logvar).sum(-1)
        log_w.append(log_px_z + log_pz_over_qz)
    log_w = torch.cat(log_w)  # (S, N)
    iwae = torch.logsumexp(log_w, 0) - np.log(n_samples)
    return log_w.mean().item(), iwae.mean().item()


@torch.no_grad()
def plain_score_samples(encode, logits, X, n_samples, gen):
    """The plain loop: importance-weighted log p(x) per row, one decoder batch per sample."""
    mu, logvar = encode(X)
    sigma = torch.exp(0.5 * logvar)
    log_w = torch.empty(n_samples, len(X))
    for s in range(n_samples):
        eps = torch.randn(mu.shape, generator=gen)
        z = mu + sigma * eps
        log_px_z = -tF.binary_cross_entropy_with_logits(logits(z), X, reduction="none").sum(-1)
        log_w[s] = log_px_z + (-0.5 * z.square() + 0.5 * eps.square() + 0.5 * logvar).sum(-1)
    return torch.logsumexp(log_w, 0) - np.log(n_samples)


# ----------------------------------------------------------------------------- driver


# name -> a new contender for (training rows, batch size, working directory)
CONTENDERS = {
    "idiomatic": lambda X, batch, workdir: Idiomatic(X, batch, SEED),
    "torch.compile": lambda X, batch, workdir: Idiomatic(X, batch, SEED, compiled=True),
    "pythae": lambda X, batch, workdir: Pythae(X, batch, SEED, workdir),
    "tight loop": lambda X, batch, workdir: Tight(X, batch, SEED),
    "tight+fused": lambda X, batch, workdir: Tight(X, batch, SEED, fused=True),
    "fastlvm.VAE": lambda X, batch, workdir: FastlvmVAE(X, batch, SEED, workdir),
}


def race(contenders, epochs):
    """{name: [seconds of each epoch]}, one epoch of each contender per round, order rotated."""
    times = {name: [] for name in contenders}
    names = list(contenders)
    for rnd in range(epochs):
        for name in names[rnd % len(names):] + names[:rnd % len(names)]:
            t0 = time.perf_counter()
            inner = contenders[name].epoch()  # a contender may time its own epoch
            times[name].append(inner if inner is not None else time.perf_counter() - t0)
        print(f"  round {rnd + 1}/{epochs}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in names),
              file=sys.stderr, flush=True)
    return times


def fit_table(batch, names, X, Xtest, epochs, eval_samples, gemm, workdir):
    contenders, skipped = {}, {}
    os.makedirs(workdir, exist_ok=True)
    for name in names:
        try:
            contenders[name] = CONTENDERS[name](X, batch, workdir)
        except Exception as exc:  # a peer that cannot run is left out of the table, with the reason
            skipped[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:150] if str(exc) else ''}"
    times = race(contenders, epochs)
    rows = {}
    for name, ts in times.items():
        timed = ts[1:] or ts
        rows[name] = {"s_per_epoch": statistics.median(timed), "best": min(timed), "first": ts[0]}
        rows[name]["elbo"], rows[name]["log_px"] = heldout(contenders[name], Xtest, eval_samples)
    lines = [f"\nbatch {batch}: {len(X)} rows, {epochs} epochs each ({epochs - 1} timed after 1 warm-up); "
             f"limit {FLOP_PER_ROW * len(X) / gemm / 1e9:.2f} s/epoch at the GEMM rate",
             f"  {'':14s} {'s/epoch':>8s} {'best':>6s} {'1st':>6s} {'rows/s':>8s} {'vs idiom':>9s} "
             f"{'vs pythae':>10s} {'of GEMM':>8s} {'ELBO':>8s} {'log p(x)':>9s}"]
    for name, r in rows.items():
        t = r["s_per_epoch"]
        vs = {p: rows[p]["s_per_epoch"] / t if p in rows else float("nan") for p in ("idiomatic", "pythae")}
        lines.append(f"  {name:14s} {t:8.3f} {r['best']:6.2f} {r['first']:6.1f} {len(X) / t:8.0f} "
                     f"{vs['idiomatic']:8.2f}x {vs['pythae']:9.2f}x {FLOP_PER_ROW * len(X) / t / 1e9 / gemm:8.1%} "
                     f"{r['elbo']:8.2f} {r['log_px']:9.2f}")
    for name, why in skipped.items():
        lines.append(f"  {name:14s} not run: {why}")
    if "fastlvm.VAE" in contenders:
        extra = statistics.median(contenders["fastlvm.VAE"].call_overhead)
        lines.append(f"  (fastlvm.VAE: its trainer's epoch time; each resumed fit call added {extra:.2f} s around it)")
    return lines, contenders


def score_table(contenders, Xtest, n_rows, n_samples, rounds, gemm):
    """fastlvm.VAE.score_samples against the plain loop over samples, on fastlvm's model if fitted.

    Both decode every (row, sample) pair: 2 * sum(in.out) decoder FLOP each (the encoder's share,
    once per row, is left out), so each rate is also given as a fraction of the GEMM rate: that
    fraction caps how far any exact estimator can outrun the plain loop."""
    model = contenders.get("fastlvm.VAE")
    X = Xtest[:n_rows]
    gen = torch.Generator().manual_seed(7)
    if model is not None:
        runs = {"fastlvm score_samples": lambda: torch.as_tensor(model.vae.score_samples(X, n_samples=n_samples)),
                "plain loop": lambda: plain_score_samples(model.encode, model.logits, X, n_samples, gen)}
    else:
        other = contenders["tight loop"]
        runs = {"plain loop": lambda: plain_score_samples(other.encode, other.logits, X, n_samples, gen)}
    times, means = {k: [] for k in runs}, {}
    for rnd in range(rounds):
        for name in list(runs)[rnd % 2:] + list(runs)[:rnd % 2]:
            t0 = time.perf_counter()
            means[name] = runs[name]().double().mean().item()
            times[name].append(time.perf_counter() - t0)
    lines = [f"\nscore_samples, S={n_samples}, {len(X)} held-out rows, best of {rounds} interleaved rounds"
             + ("" if model is not None else " (fastlvm.VAE not available: the plain loop alone, tight loop's model)")]
    flop = 2 * sum(a * b for a, b in zip(DEC_SIZES, DEC_SIZES[1:])) * len(X) * n_samples
    for name, ts in times.items():
        ratio = min(times["plain loop"]) / min(ts)
        lines.append(f"  {name:22s} {min(ts):7.2f} s {len(X) / min(ts):8.1f} rows/s {ratio:6.2f}x plain loop "
                     f"(target 3x), decoder at {flop / min(ts) / 1e9 / gemm:5.1%} of GEMM; "
                     f"mean log p(x) {means[name]:.2f}")
    return lines


def gemm_rates(machine_path):
    """float32 GEMM GFLOP/s: bench/machine.py's (numpy's BLAS) and torch's on the same product."""
    if machine_path:
        with open(machine_path) as f:
            m = json.load(f)
    else:
        sys.path.insert(0, HERE)
        import machine

        m = {"gemm_gflops": {"float32": machine.gemm_gflops("float32")}, **machine.blas_info()}
    n = 4096
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(3))
    return m["gemm_gflops"]["float32"], 2 * n**3 / best / 1e9, m.get("blas", "?")


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4,000 rows, 2 epochs, small evaluation: a smoke run")
    ap.add_argument("--rows", type=int, default=20_000, help="training rows (default 20,000)")
    ap.add_argument("--test-rows", type=int, default=1_000, help="held-out rows (default 1,000)")
    ap.add_argument("--epochs", type=int, default=4, help="epochs per contender; the first is not timed (default 4)")
    ap.add_argument("--batches", default="128,1024", help="batch sizes (default 128,1024)")
    ap.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated, of: " + ", ".join(CONTENDERS))
    ap.add_argument("--eval-samples", type=int, default=100, help="draws per held-out row for the scores (default 100)")
    ap.add_argument("--score-rows", type=int, default=256, help="rows for the score_samples race (default 256)")
    ap.add_argument("--score-samples", type=int, default=1000, help="S for the score_samples race (default 1000)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for everyone (default 2)")
    ap.add_argument("--machine", help="bench/machine.py --json output (else the GEMM rate is measured now)")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.contenders.split(",") if n.strip()]
    if set(names) - set(CONTENDERS):
        ap.error(f"unknown contenders {sorted(set(names) - set(CONTENDERS))}; known: {', '.join(CONTENDERS)}")
    if args.quick:
        args.rows, args.test_rows, args.epochs = 4_000, 300, 2
        args.eval_samples, args.score_rows, args.score_samples = 20, 64, 200
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    started = time.perf_counter()
    gemm, torch_gemm, blas = gemm_rates(args.machine)
    X, Xtest = make_data(args.rows, args.test_rows)
    print(f"CPU {cpu_model()}, {os.cpu_count()} CPUs (shared), torch {torch.__version__} with {args.threads} threads, "
          f"float32; load average {load_before[0]:.1f} at the start")
    print(f"GEMM float32 4096^3: {gemm:.0f} GFLOP/s ({blas}, bench/machine.py), torch {torch_gemm:.0f} GFLOP/s; "
          f"model {'-'.join(map(str, ENC_SIZES))} / {'-'.join(map(str, DEC_SIZES))}, "
          f"{FLOP_PER_ROW / 1e6:.2f} MFLOP per row (6 x sum of layer in.out)")
    print(f"held-out scores: {len(Xtest)} rows, S={args.eval_samples} draws, nats per row (ELBO: mean over the draws; "
          "log p(x): importance-weighted)")
    with tempfile.TemporaryDirectory() as workdir:
        contenders = {}
        for batch in (int(b) for b in args.batches.split(",")):
            lines, contenders = fit_table(batch, names, X, Xtest, args.epochs, args.eval_samples, gemm,
                                          os.path.join(workdir, str(batch)))
            print("\n".join(lines), flush=True)
        if "tight loop" in contenders or "fastlvm.VAE" in contenders:
            print("\n".join(score_table(contenders, Xtest, args.score_rows, args.score_samples, rounds=2,
                                        gemm=gemm)))
    load = os.getloadavg()[0]
    print(f"\ns/epoch: median of the timed epochs; best: the fastest; 1st: the warm-up epoch (compiles). "
          f"CPU {cpu_model()}; load average {load_before[0]:.1f} before, {load:.1f} after; "
          f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
