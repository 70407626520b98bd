"""Serial or parallel layout kernels, chosen by measuring both (their outputs are identical either way).

Numba's parallel kernels run on OpenMP threads that spin at the end of each region. On a quiet machine they use
both cores well (the padded and packed layouts ~1.8x faster than serial on 2 cores); on a loaded one a
descheduled thread stalls every batch: with a load average of ~10 on 2 cores they measured 4-10x *slower* than
serial. :class:`KernelMode` times the calls made in each mode (seconds per unit of work) and uses the faster,
trying the other one after ``explore_every`` calls, then half as often each time that try loses (at most every
64 x ``explore_every`` calls), so a collator follows the machine's load at a small cost. While the load average
exceeds the cores, parallel kernels are not even tried (a try would cost 10x and tell nothing new). Inside DataLoader
workers and prefetch threads the kernels always run serially (those already run side by side).
"""

from __future__ import annotations

import os
import time

from datapipe.prefetch import may_parallelize


_LOAD = [0.0, 0.0]  # when /proc/loadavg was last read, and whether the cores were taken then


def _busy() -> bool:
    """The 1-minute load average exceeds the cores (+1 for this process's own threads); read at most once a
    second. Where it is not available (Windows), never busy."""
    now = time.monotonic()
    if now - _LOAD[0] > 1.0:
        try:
            _LOAD[1] = float(os.getloadavg()[0] > (os.cpu_count() or 1) + 1)
        except (OSError, AttributeError):
            _LOAD[1] = 0.0
        _LOAD[0] = now
    return bool(_LOAD[1])


class KernelMode:
    """Picks serial or parallel kernels for one collator from measured costs.

    Args:
        explore_every: calls between tries of the mode not currently preferred (doubling while it loses).
    """

    def __init__(self, explore_every: int = 16):
        self.explore_every = int(explore_every)
        self._cost = [0.0, 0.0]  # smoothed seconds per unit of work: serial, parallel (0.0: not measured)
        self._seen = [0, 0]
        self._calls = 0
        self._next_try = self.explore_every  # calls until the next try of the other mode
        self._trying = -1

    def pick(self) -> bool:
        """True to run the parallel kernels this call."""
        if not may_parallelize():
            return False
        if self._seen[0] < 2:  # the first call of a mode loads its machine code: not a measurement
            return False
        if self._seen[1] < 2:
            return not _busy()
        self._calls += 1
        best = self._cost[1] < self._cost[0]
        if self._calls >= self._next_try:
            self._calls = 0
            if best or not _busy():  # no parallel try while the cores are taken: it would cost 10x, not tell
                self._trying = int(not best)
                return not best
        return best

    def record(self, parallel: bool, seconds: float, work: int) -> None:
        """Account a call's wall time ``seconds`` for ``work`` units (tokens written); ``work=0``: not a
        measurement (e.g. the outputs were fresh memory, whose page faults the kernel paid)."""
        if not may_parallelize():  # a worker or prefetch thread: serial by rule, and its timings (threads side by
            return                 # side) would misstate what a serial call costs in the main thread
        i = int(parallel)
        if work <= 0:
            if self._trying == i:
                self._trying = -1
                self._calls = self._next_try - 1  # try again on the next call
            return
        self._seen[i] += 1
        if self._seen[i] == 1:
            return
        c = seconds / work
        if self._trying == i:  # a try of the mode not preferred: while it keeps losing, try it less often
            self._trying = -1
            won = c < self._cost[1 - i]
            self._next_try = self.explore_every if won else min(2 * self._next_try, 64 * self.explore_every)
        self._cost[i] = c if not self._cost[i] else 0.5 * self._cost[i] + 0.5 * c

    def __getstate__(self):
        return {"explore_every": self.explore_every}  # measurements belong to this process

    def __setstate__(self, state):
        self.__init__(state["explore_every"])
