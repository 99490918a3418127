"""The C++ kernels' output buffers (``_C.empty``): memory is reused only once its tensor is
gone, so gradients a caller keeps are never overwritten by the next step."""

import numpy as np
import torch

import fastlvm.functional as F
from fastlvm.kernels.cpp import _C

BIG = (1024, 1024)  # 4 MiB of float32: pooled


def test_freed_block_is_reused_and_live_blocks_are_distinct():
    a = _C.empty(BIG, np.dtype(np.float32))
    b = _C.empty(BIG, np.dtype(np.float32))
    assert a.ctypes.data != b.ctypes.data
    a[:] = 1.0
    b[:] = 2.0
    assert (a == 1.0).all()
    where, before = a.ctypes.data, _C.cached_bytes()
    del a
    assert _C.cached_bytes() > before
    c = _C.empty(BIG, np.dtype(np.float32))
    assert c.ctypes.data == where and _C.cached_bytes() == before
    assert c.flags["C_CONTIGUOUS"] and c.flags["WRITEABLE"] and c.shape == BIG


def test_kept_gradients_survive_the_next_step():
    def step(seed):
        g = torch.Generator().manual_seed(seed)
        mean = torch.randn(256, 4096, generator=g, requires_grad=True)  # 4 MiB gradients
        lv = (0.1 * torch.randn(256, 4096, generator=g)).requires_grad_()
        x = torch.rand(256, 4096, generator=g)
        kl = torch.rand(256, generator=g)
        loss = F.negative_elbo(x, kl, mean=mean, logvar=lv)
        return torch.autograd.grad(loss, (mean, lv))

    kept = step(0)
    copies = [g.clone() for g in kept]
    for seed in (1, 2):
        step(seed)  # its gradients are freed at once, and their blocks reused
    for g, c in zip(kept, copies):
        assert torch.equal(g, c)
