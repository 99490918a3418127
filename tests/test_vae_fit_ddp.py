"""fastlvm.VAE and fastlvm.VQVAE under torch.distributed: two gloo processes on this machine
(started by torchrun, the command the README shows) give the model of one process, in float64
within 1e-6 (for the VQ-VAE also its codebook, seeded and re-seeded from the global batch)."""

import os
import re
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

import fastlvm

_SCRIPT = textwrap.dedent("""
    import os, sys
    import numpy as np, torch, torch.distributed as dist
    from sklearn.datasets import load_digits
    import fastlvm
    from fastlvm.vae import model, vq

    rows = [0]  # rows this rank trains on (the module's forward sees its shard of each batch)
    Module = vq.VQVAEModule if sys.argv[3] == "VQVAE" else model.VAEModule
    forward = Module.forward
    def counting(self, x, *args):
        rows[0] += x.shape[0]
        return forward(self, x, *args)
    Module.forward = counting

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    X = load_digits().data[:500] / 16.0
    kw = eval(sys.argv[2])
    vae = getattr(fastlvm, sys.argv[3])(**kw).fit(X)
    if dist.get_rank() == 0:
        vae.save(sys.argv[1])
    # one write of the whole line: the ranks share the pipe, and print's pieces interleaved with the
    # other rank's ("rank rank 0 ... / 1 world ...")
    os.write(1, f"rank {dist.get_rank()} world {dist.get_world_size()} rows {rows[0]}\\n".encode())
    dist.barrier()  # neither rank tears gloo down while the other still talks to it (a rank aborted there)
    dist.destroy_process_group()
""")

CASES = [
    # 450 training rows in batches of 25: every global batch split 12 / 13 between the ranks
    ("VAE", dict(latent_dim=3, hidden=(32,), batch_size=25, max_epochs=3, dtype="float64", random_state=0,
                 n_samples=2)),
    ("VAE", dict(latent_dim=3, hidden=(32,), batch_size=32, max_epochs=2, dtype="float64", random_state=1,
                 free_bits=0.05, beta=0.5, validation_fraction=0.2)),
    ("VAE", dict(latent_dim=3, hidden=(16,), batch_size=40, max_epochs=2, dtype="float64", random_state=2,
                 objective="iwae", n_samples=3, likelihood="gaussian", decoder_variance="feature")),
    # the codebook learned by its loss term and by moving averages; a high dead-code threshold makes
    # every epoch re-seed codes, from the global batch's worst-quantised vectors
    ("VQVAE", dict(codebook_size=16, code_dim=2, codes_per_row=2, ema_decay=None, dead_code_threshold=0.5,
                   hidden=(32,), batch_size=25, max_epochs=2, dtype="float64", random_state=3)),
    ("VQVAE", dict(codebook_size=16, code_dim=2, codes_per_row=2, ema_decay=0.9, dead_code_threshold=0.5,
                   hidden=(32,), batch_size=25, max_epochs=2, dtype="float64", random_state=4)),
]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("estimator,kw", CASES)
def test_two_gloo_processes_give_the_model_of_one(tmp_path, estimator, kw, monkeypatch):
    script = tmp_path / "fit_ddp.py"
    script.write_text(_SCRIPT)
    out = tmp_path / "ddp.npz"
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(script), str(out), repr(kw),
           estimator]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    # the two processes share the pipe, so one's line may land inside the other's: match, don't split lines
    ranks = {rank: rows for rank, rows in re.findall(r"rank (\d+) world 2 rows (\d+)", run.stdout)}
    assert sorted(ranks) == ["0", "1"], run.stdout
    Estimator = getattr(fastlvm, estimator)
    ddp = Estimator.load(out)
    X = load_digits().data[:500] / 16.0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    from fastlvm.vae import model, vq

    rows = [0]
    Module = vq.VQVAEModule if estimator == "VQVAE" else model.VAEModule
    forward = Module.forward

    def counting(self, x, *args):
        rows[0] += x.shape[0]
        return forward(self, x, *args)

    monkeypatch.setattr(Module, "forward", counting)
    try:
        one = Estimator(**kw).fit(X)
    finally:
        torch.set_num_threads(threads)
    # each rank trained on its own half of every batch
    shares = sorted(int(v) for v in ranks.values())
    assert sum(shares) == rows[0] and rows[0] - 4 * one.n_epochs_ * 20 < 2 * shares[0] <= rows[0]
    assert ddp.n_epochs_ == one.n_epochs_
    for name, a in one.model_.state_dict().items():
        a, b = a.double(), ddp.model_.state_dict()[name].double()
        rel = float((a - b).norm() / a.norm())
        assert rel < 1e-6, (name, rel)
    for e1, e2 in zip(one.history_, ddp.history_):
        assert e2["loss"] == pytest.approx(e1["loss"], rel=1e-9)
        if "val_loss" in e1:
            assert e2["val_loss"] == pytest.approx(e1["val_loss"], rel=1e-9)
        assert e2.get("reseeded_codes") == e1.get("reseeded_codes")
    if estimator == "VQVAE":
        assert sum(e["reseeded_codes"] for e in one.history_) > 0  # the re-seeding ran
    np.testing.assert_allclose(getattr(ddp, Estimator._SUMMARY), getattr(one, Estimator._SUMMARY), rtol=1e-6)
