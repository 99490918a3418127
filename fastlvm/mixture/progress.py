"""Progress of an EM run on stderr: verbose=1 prints a line every verbose_interval iterations,
verbose>=2 shows a tqdm bar with the objective and the rows per second."""

import sys
import time


class Progress:
    """The on_step callback of one run (fastlvm.mixture.em.run_em); close() ends the run's report."""

    def __init__(self, verbose, verbose_interval, max_iter, n_rows, init):
        self.verbose, self.interval, self.n_rows = verbose, verbose_interval, n_rows
        self.max_iter, self.init = max_iter, init
        self.bar = None
        self.t_last = None
        if verbose:
            print(f"Initialization {init}", file=sys.stderr)

    def start(self):
        """The run's iterations begin (after its initial parameters were computed)."""
        self.t_last = time.perf_counter()
        if self.verbose >= 2:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.max_iter, desc=f"EM init {self.init}", unit="it", file=sys.stderr)

    def __call__(self, run):
        now = time.perf_counter()
        dt, self.t_last = now - self.t_last, now
        rate = self.n_rows / max(dt, 1e-9)
        change = run.objective - (run.history[-2] if len(run.history) > 1 else float("-inf"))
        if self.bar is not None:
            self.bar.set_postfix(lower_bound=f"{run.objective:.6f}", rows_per_s=f"{rate:,.0f}", refresh=False)
            self.bar.update(1)
        elif self.verbose and run.n_iter % self.interval == 0:
            print(f"  Iteration {run.n_iter}: lower bound {run.objective:.6f}, change {change:.3g}, "
                  f"{dt:.3f} s, {rate:,.0f} rows/s", file=sys.stderr)

    def close(self, run):
        if self.bar is not None:
            self.bar.close()
        if self.verbose:
            state = "converged" if run.converged else "did not converge"
            print(f"Initialization {state}. lower bound {run.objective:.6f}", file=sys.stderr)
