"""The threads that run a pass: one serial, nogil kernel per thread, each claiming fixed blocks of
rows from a shared counter (simd.claim) until none is left, the caller's thread among them. Plain
threads rather than Numba's parallel loops, which compile several times slower; the kernels never
call threaded BLAS meanwhile (one level of parallelism).

A thread that slept was woken 40-180 us later (a virtual machine's idle vCPU), at the start and
again at the end of every pass: ~0.13 ms of a 2.5 ms k-means pass (200k x 32, K=16, 2 vCPUs). So
between passes a worker spins for up to SPIN_TICKS (~1 ms) before it sleeps, and so does the caller
for the workers' finish. A worker spins on the next pass's block counter, which only moves once the
caller's own share has claimed a block, inside its nogil kernel: the GIL is free by then (a worker
that saw the job posted took the GIL while the caller still held it, and slept on it).
"""

import atexit
import ctypes
import os
import platform
import threading

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from fastlvm.kernels.simd import claim

SPIN_TICKS = 1 << 21  # time-stamp counter ticks (~0.5-1 ms) a thread spins before it sleeps
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")

_pool = None
_pool_threads = []  # the pool's native thread ids
_pool_cpus = None  # the CPUs the pool's threads may run on (None: any)
_caller_cpu = None  # the caller's CPU that _pool_cpus leaves out
try:
    _sched_getcpu = ctypes.CDLL(None).sched_getcpu
except (AttributeError, OSError, TypeError):  # not glibc: leave the placement to the scheduler
    _sched_getcpu = None


@intrinsic
def _load_acquire(typingctx, flag):
    """flag[0] (int64), read anew at every call."""
    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        return builder.load_atomic(data, "acquire", 8)

    return types.int64(flag), codegen


@intrinsic
def _ticks(typingctx):
    """The x86 time-stamp counter (elsewhere 0: reading the cycle counter may trap in user mode)."""
    def codegen(context, builder, sig, args):
        if not _X86:
            return ir.Constant(ir.IntType(64), 0)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(64), []),
                                            "llvm.readcyclecounter")
        return builder.call(fn, [])

    return types.int64(), codegen


@intrinsic
def _relax(typingctx):
    """A spin-wait hint (x86 `pause`: the core's other hyperthread runs meanwhile)."""
    def codegen(context, builder, sig, args):
        if _X86:
            builder.call(cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                        "llvm.x86.sse2.pause"), [])
        return context.get_dummy_value()

    return types.none(), codegen


@njit(nogil=True, cache=True)
def _spin_until(flag, at_least, max_ticks, finished, done):
    """flag[0] once it is at least `at_least`, or after max_ticks of spinning (without x86's clock,
    max_ticks turns of the loop); first, if done, finished[0] += 1 (atomically). One function
    for every wait: each costs a compile."""
    if done:
        claim(finished)
    start = _ticks()
    turns = 0
    while True:
        value = _load_acquire(flag)
        turns += 1
        if value >= at_least or _ticks() - start > max_ticks or (not _X86 and turns > max_ticks):
            return value
        _relax()


class _Pool:
    """Threads 1, 2, .. that run a job (fn, args, counter, n_workers): those below n_workers call
    fn(*args, index, counter), then count themselves in `finished`."""

    def __init__(self):
        self.started = np.zeros(1, dtype=np.int64)  # jobs handed out
        self.finished = np.zeros(1, dtype=np.int64)  # workers done with the current job
        self.next_counter = np.zeros(1, dtype=np.int64)  # the block counter of the next job
        self.wake = threading.Condition()
        self.job = None
        self.errors = []
        self.busy = threading.Lock()  # one caller's pass at a time
        self.n_threads = 0

    def grow(self, n_threads):
        while self.n_threads < n_threads:
            self.n_threads += 1
            # The jobs it has seen: none after this one (grown before a job is handed out).
            threading.Thread(target=self._serve, args=(self.n_threads, int(self.started[0]), self.next_counter),
                             name=f"fastlvm-{self.n_threads}", daemon=True).start()

    def _serve(self, index, seen, counter):
        _note_thread()
        done = False  # whether to count the last job done in `finished`
        while True:
            # One nogil call from the end of one job to the start of the next: the GIL taken in
            # between, while the caller held it, cost a sleep and a wake-up.
            if _spin_until(counter, 1, SPIN_TICKS, self.finished, done) < 1 or self.started[0] <= seen:
                with self.wake:
                    while self.started[0] <= seen:
                        self.wake.wait()
            seen, counter = int(self.started[0]), self.next_counter  # with the job: one snapshot under the GIL
            fn, args, job_counter, n_workers = self.job
            done = index < n_workers
            if done:
                try:
                    fn(*args, index, job_counter)
                except BaseException as error:  # noqa: BLE001 (raised again in the caller)
                    self.errors.append(error)

    def run(self, fn, n_workers, args):
        counter, self.next_counter = self.next_counter, np.zeros(1, dtype=np.int64)
        self.finished[0] = 0
        self.errors.clear()
        self.job = (fn, args, counter, n_workers)
        with self.wake:
            self.started[0] += 1
            self.wake.notify_all()
        try:
            fn(*args, 0, counter)
        finally:  # the workers still read args: wait for them whatever happened here
            others = n_workers - 1
            while _spin_until(self.finished, others, SPIN_TICKS, self.finished, False) < others:
                with self.wake:  # a worker far behind: nap between looks
                    self.wake.wait(SPIN_TICKS / 2e9)
        if self.errors:
            raise self.errors[0]


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
    """In a forked child: the parent's pool threads do not exist there (a pass would wait for them
    forever), so the next pass starts a pool of its own."""
    global _pool, _pool_cpus, _caller_cpu
    _pool, _pool_cpus, _caller_cpu = None, None, None
    _pool_threads.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


@atexit.register
def _stop_spinning():
    """At exit, wake spinning workers: they then sleep in Python, not in compiled code that the
    interpreter's teardown may free."""
    if _pool is not None:  # (a pass after this one, from a later exit handler, takes a fresh counter)
        spun_on, _pool.next_counter = _pool.next_counter, np.zeros(1, dtype=np.int64)
        spun_on[0] = 1


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
    others waited for it (the main thread waited 0.3 ms of a 3.9 ms k-means pass on average). While
    another thread's pass holds the pool, the caller's thread takes every block itself."""
    global _pool
    counter = np.zeros(1, dtype=np.int64)
    if n_workers == 1:
        fn(*args, 0, counter)
        return
    if _pool is None:
        _pool = _Pool()
    pool = _pool
    if not pool.busy.acquire(blocking=False):
        fn(*args, 0, counter)
        return
    try:
        pool.grow(n_workers - 1)
        _keep_pool_off_callers_cpu()
        pool.run(fn, n_workers, args)
    finally:
        pool.busy.release()
