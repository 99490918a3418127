"""fastlvm.kernels.workers: every block claimed once, the pool's threads kept off the caller's CPU,
a forked child's own pool."""

import os
import subprocess
import sys

import numpy as np
import pytest

from fastlvm.kernels import workers


def _claim_kernel():
    """A kernel over blocks: counts[i] += 1 and owner[i] = worker for every block i it claims; the
    worker numbered fail_on raises after its blocks."""
    from numba import njit

    from fastlvm.kernels.simd import claim

    @njit(nogil=True)
    def take(counts, owner, fail_on, worker, counter):
        while True:
            i = claim(counter)
            if i >= counts.shape[0]:
                break
            counts[i] += 1
            owner[i] = worker
        if worker == fail_on:
            raise ValueError("worker failed")

    return take


def _blocks(n):
    return np.zeros(n, dtype=np.int64), np.full(n, -1, dtype=np.int64)


@pytest.mark.parametrize("n_workers", [1, 3])
def test_workers_claim_every_block_exactly_once(n_workers):
    """workers.on_workers with simd.claim: each of n items is taken by exactly one worker, whichever
    thread is slower, and every worker's index reaches the kernel."""
    counts, owner = _blocks(5000)
    workers.on_workers(_claim_kernel(), n_workers, counts, owner, -1)
    np.testing.assert_array_equal(counts, np.ones(5000, dtype=np.int64))
    assert set(np.unique(owner)) <= set(range(n_workers)) and owner.min() >= 0


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux thread affinity and two CPUs")
def test_pool_threads_stay_off_the_callers_cpu():
    """After a pass on two workers the pool's threads may run on every allowed CPU but the one the
    caller ran on (the scheduler had put them on the caller's own CPU after an idle spell)."""
    if workers._sched_getcpu is None:
        pytest.skip("no sched_getcpu")
    from numba import njit

    @njit(nogil=True)
    def nothing(out, worker, counter):
        out[worker] = 1

    out = np.zeros(2)
    workers.on_workers(nothing, 2, out)
    assert out.tolist() == [1, 1] and workers._pool_threads
    for tid in workers._pool_threads:
        allowed = os.sched_getaffinity(tid)
        assert allowed and workers._caller_cpu not in allowed
        assert allowed <= os.sched_getaffinity(0)


def test_a_forked_child_runs_passes_of_its_own():
    """A fit in a process forked after a fit in its parent: the parent's pool threads do not exist
    there; the child must not wait on them."""
    if "fork" not in __import__("multiprocessing").get_all_start_methods():
        pytest.skip("no fork")
    code = """if True:
        import multiprocessing as mp, numpy as np, numba
        from fastlvm import KMeans
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        X = np.random.default_rng(0).normal(size=(20_000, 4))
        def fit(_):
            return KMeans(3, n_init=1, random_state=0).fit(X).inertia_
        if __name__ == "__main__":
            parent = fit(0)
            with mp.get_context("fork").Pool(1) as pool:
                child = pool.map_async(fit, [0]).get(timeout=60)[0]
            assert child == parent, (child, parent)
            print("ok")
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_pool_serves_passes_of_any_width_back_to_back():
    """Passes on 2, 4, 3, 2 workers in a row (the pool grown to the widest, its extra threads left
    out of the narrower passes), each block claimed once, then a worker's error raised in the caller
    and the pool still serving passes after it."""
    take = _claim_kernel()
    for n_workers in (2, 4, 3, 2, 4, 4, 2):
        counts, owner = _blocks(3000)
        workers.on_workers(take, n_workers, counts, owner, -1)
        np.testing.assert_array_equal(counts, 1)
        assert owner.max() < n_workers
    with pytest.raises(ValueError, match="worker failed"):
        workers.on_workers(take, 3, *_blocks(3000), 2)
    counts, owner = _blocks(3000)
    workers.on_workers(take, 3, counts, owner, -1)
    np.testing.assert_array_equal(counts, 1)


def test_callers_on_several_threads_share_the_pool():
    """Passes from four Python threads at once: the pool serves one at a time, the others run on
    their caller's thread alone; every pass claims each of its blocks once."""
    import threading

    take = _claim_kernel()
    results, errors = [], []

    def calls():
        try:
            for _ in range(50):
                counts, owner = _blocks(2000)
                workers.on_workers(take, 2, counts, owner, -1)
                results.append(bool((counts == 1).all()))
        except Exception as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=calls) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == 200 and all(results)


def test_passes_after_the_exit_hook_claim_every_block():
    """The exit hook wakes the spinning workers; a pass after it (from a later exit handler) still
    claims each block once."""
    take = _claim_kernel()
    workers.on_workers(take, 2, *_blocks(100), -1)
    workers._stop_spinning()
    for _ in range(3):
        counts, owner = _blocks(3000)
        workers.on_workers(take, 2, counts, owner, -1)
        np.testing.assert_array_equal(counts, 1)
