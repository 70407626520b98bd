"""Serial or parallel layout kernels, chosen by measuring both (their outputs are identical either way).

Numba's parallel kernels run on OpenMP threads that spin at the end of each region. On a quiet machine they use
both cores well (the padded and packed layouts ~1.8x faster than serial on 2 cores); on a loaded one a
descheduled thread stalls every batch: with a load average of ~10 on 2 cores they measured 4-10x *slower* than
serial. :class:`KernelMode` times the calls made in each mode (seconds per unit of work; a mode's cost is the median
of its last calls) and uses the faster, trying the other one for a few calls in a row after ``explore_every``
calls, then half as often each time that try loses (at most every 64 x ``explore_every`` calls, and at least every
``max_wait`` seconds), so a collator follows the machine's load at a small cost. While the load average
exceeds the cores, parallel kernels are not even tried (a try would cost 10x and tell nothing new). Inside DataLoader
workers and prefetch threads the kernels always run serially (those already run side by side).
"""

from __future__ import annotations

import os
import time
from collections import deque

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

    Each mode's cost is the median of its last ``window`` calls (seconds per unit of work), so one preempted call
    does not turn the choice. The mode not preferred is tried every ``explore_every`` calls (doubling while it
    loses, at most 64x) for ``trial`` calls in a row, whose first is not counted: after a stretch of serial calls
    the first parallel call pays for waking Numba's threads, which a single-call try would mistake for the mode's
    cost (it kept a measured-faster parallel kernel switched off for thousands of batches).

    Args:
        explore_every: calls between tries of the mode not currently preferred (doubling while it loses).
        trial: calls in a row per try (the first not counted).
        window: calls per mode whose median is the mode's cost.
        max_wait: seconds after which the other mode is tried whatever the call count (a loaded machine that went
            quiet gets its parallel kernels back within seconds, not thousands of batches).
    """

    def __init__(self, explore_every: int = 16, trial: int = 4, window: int = 8, max_wait: float = 2.0):
        self.explore_every, self.trial, self.window = int(explore_every), max(2, int(trial)), int(window)
        self.max_wait = float(max_wait)
        self._costs: tuple[deque, deque] = (deque(maxlen=self.window), deque(maxlen=self.window))
        self._seen = [0, 0]
        self._calls = 0
        self._next_try = self.explore_every  # calls until the next try of the other mode
        self._trying = -1  # the mode under trial, and its calls still to come
        self._left = 0
        self._best = 0  # the preferred mode, updated as costs are recorded
        self._since = 0  # calls recorded since it was
        self._last_try = time.monotonic()

    def cost(self, parallel: bool) -> float:
        """Median seconds per unit of work of the last calls in one mode (0.0: not measured yet)."""
        c = sorted(self._costs[int(parallel)])
        return 0.5 * (c[(len(c) - 1) // 2] + c[len(c) // 2]) if c else 0.0

    def _preferred(self) -> int:
        return int(self.cost(True) < self.cost(False))

    def pick(self) -> bool:
        """True to run the parallel kernels this call."""
        if not may_parallelize():
            return False
        if self._seen[0] < 2:  # the first call of a mode loads its machine code: not a measurement
            return False
        if self._seen[1] < 2:
            return not _busy()
        if self._left > 0:
            return bool(self._trying)
        best = self._best
        self._calls += 1
        now = time.monotonic()
        if self._calls >= self._next_try or now - self._last_try > self.max_wait:
            self._calls, self._last_try = 0, now
            if best or not _busy():  # no parallel try while the cores are taken: it would cost 10x, not tell
                self._trying, self._left = 1 - best, self.trial
                self._costs[self._trying].clear()  # the try measures the mode afresh
                return bool(self._trying)
        return bool(best)

    def record(self, parallel: bool, seconds: float, work: int) -> None:
        """Account a call's wall time ``seconds`` for ``work`` units (tokens written); ``work=0``: not a
        measurement (e.g. the outputs were fresh memory, whose page faults the kernel paid)."""
        if not may_parallelize():  # a worker or prefetch thread: serial by rule, and its timings (threads side by
            return                 # side) would misstate what a serial call costs in the main thread
        i = int(parallel)
        if work <= 0:
            return
        self._seen[i] += 1
        if self._seen[i] == 1:
            return
        in_trial = self._left > 0 and self._trying == i
        if in_trial:
            self._left -= 1
            if self._left == self.trial - 1:  # the try's first call: threads waking, caches cold
                return
        self._costs[i].append(seconds / work)
        self._since += 1
        if not (self._left > 0 and self._trying >= 0) and (self._since >= 4 or self._seen[i] <= 2):
            self._best = self._preferred()  # medians of a few calls: recomputed every 4 calls, not every call
            self._since = 0
        if in_trial and self._left == 0:  # the try is over: keep the winner, try the loser less often
            self._best, self._since = self._preferred(), 0
            won = self._best == i
            self._next_try = self.explore_every if won else min(2 * self._next_try, 64 * self.explore_every)
            self._trying = -1

    def __getstate__(self):
        return {"explore_every": self.explore_every, "trial": self.trial, "window": self.window,
                "max_wait": self.max_wait}

    def __setstate__(self, state):
        self.__init__(**state)
