"""The threads that run a pass: one serial, nogil kernel per thread, each claiming fixed blocks of
rows from a shared counter (simd.claim) until none is left, the caller's thread among them. Plain
threads rather than Numba's parallel loops, which compile several times slower; the kernels never
call threaded BLAS meanwhile (one level of parallelism)."""

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

_pool = None
_pool_threads = []  # the pool's native thread ids
_pool_cpus = None  # the CPUs the pool's threads may run on (None: any)
_caller_cpu = None  # the caller's CPU that _pool_cpus leaves out
try:
    _sched_getcpu = ctypes.CDLL(None).sched_getcpu
except (AttributeError, OSError, TypeError):  # not glibc: leave the placement to the scheduler
    _sched_getcpu = None


def _pin(tid):
    try:
        os.sched_setaffinity(tid, _pool_cpus)
    except OSError:  # not permitted here: leave the placement to the scheduler
        pass


def _note_thread():
    tid = threading.get_native_id()
    _pool_threads.append(tid)
    if _pool_cpus:
        _pin(tid)


def _forget_pool():
    """In a forked child: the parent's pool threads do not exist there (its executor would queue work
    for them forever), so the next pass starts a pool of its own."""
    global _pool, _pool_cpus, _caller_cpu
    _pool, _pool_cpus, _caller_cpu = None, None, None
    _pool_threads.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _keep_pool_off_callers_cpu():
    """Let the pool's threads run on any allowed CPU but the caller's. After an idle spell (0.3 s)
    Linux woke them on the caller's own CPU, here a virtual machine's two vCPUs with a shared L3,
    and there they shared one CPU until its periodic load balancing moved them, ~60 ms later: two
    workers ran no faster than one (1.2 against 0.65 ms a call, hot), which cost a 10-iteration
    200k-row k-means fit 20 ms of its 45."""
    global _pool_cpus, _caller_cpu
    if _sched_getcpu is None or not hasattr(os, "sched_setaffinity"):
        return
    here = _sched_getcpu()
    if here == _caller_cpu:
        return
    _caller_cpu = here
    _pool_cpus = os.sched_getaffinity(0) - {here}
    if _pool_cpus:
        for tid in _pool_threads:
            _pin(tid)


def on_workers(fn, n_workers, *args):
    """fn(*args, w, counter) for w < n_workers, on n_workers threads (the caller's among them): a
    kernel over blocks claims them from the shared counter (simd.claim) until none is left. On a
    shared host one core is often slowed: with every n_workers-th block given to each thread, the
    others waited for it (the main thread waited 0.3 ms of a 3.9 ms k-means pass on average)."""
    global _pool
    counter = np.zeros(1, dtype=np.int64)
    if n_workers == 1:
        fn(*args, 0, counter)
        return
    if _pool is None or _pool._max_workers < n_workers - 1:
        if _pool is not None:
            _pool.shutdown(wait=True)
            _pool_threads.clear()
        _pool = ThreadPoolExecutor(n_workers - 1, thread_name_prefix="fastlvm", initializer=_note_thread)
    _keep_pool_off_callers_cpu()
    futures = [_pool.submit(fn, *args, w, counter) for w in range(1, n_workers)]
    fn(*args, 0, counter)
    for f in futures:
        f.result()
