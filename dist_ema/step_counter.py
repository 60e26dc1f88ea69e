"""The process-wide optimizer step count, for ``PostHocEMA.update()``'s skipped-step check.

One *global* optimizer step post hook
(``torch.optim.optimizer.register_optimizer_step_post_hook``) counts the ``step()`` calls of
every torch optimizer in the process (one integer increment per step). An ``update()`` with
no optimizer step since the previous one changed no weight (``torch.amp.GradScaler`` skipped
the step on inf gradients, or ``update()`` runs more than once per step) and is skipped.

The hook is installed by the first :class:`OptimizerSteps` of the process and removed when
the last one is released (``release()``, or garbage collection without it); a later one
installs it again. The count only grows, across removals.
"""

from __future__ import annotations

import threading
import weakref

__all__ = ["STEP_COUNTER", "OptimizerSteps", "StepCounter"]


class StepCounter:
    """Counts the torch optimizer steps taken in this process, while at least one user holds it.

    It runs after ``step()`` of every torch optimizer in the process, not only the tracked
    model's, so it tells whether some optimizer stepped since a moment, nothing more.
    ``steps`` only grows; ``users`` counts the holders; ``handle`` is torch's RemovableHandle
    while the hook is installed (None otherwise).
    """

    def __init__(self) -> None:
        self.steps = 0
        self.users = 0
        self.handle = None  # torch's RemovableHandle while installed
        self._lock = threading.RLock()  # release() also runs from garbage collection, in any thread

    def _count(self, optimizer, args, kwargs) -> None:
        self.steps += 1

    def acquire(self) -> None:
        with self._lock:
            self.users += 1
            if self.handle is None:
                from torch.optim.optimizer import register_optimizer_step_post_hook

                self.handle = register_optimizer_step_post_hook(self._count)

    def release(self) -> None:
        with self._lock:
            self.users -= 1
            if self.users == 0 and self.handle is not None:
                self.handle.remove()
                self.handle = None


STEP_COUNTER = StepCounter()


class OptimizerSteps:
    """One EMA's hold on :data:`STEP_COUNTER`: whether a torch optimizer stepped since its previous update.

    Holds the counter from construction until :meth:`release` (idempotent) or garbage
    collection; :meth:`seen` takes it up again after a release. The check applies once a torch
    optimizer stepped after the (latest) hold: before that, every update counts.

    Example:
        >>> steps = OptimizerSteps()
        >>> seen = steps.seen()
        >>> if steps.stepped(seen):
        ...     steps.updated(seen)      # the update went ahead
    """

    def __init__(self) -> None:
        self._release: weakref.finalize | None = None
        self.hold()

    def hold(self) -> None:
        """Take part in the process-wide count (installs the hook for the first holder)."""
        STEP_COUNTER.acquire()
        # garbage collection without release() lets go of it too; calling the finalizer runs it once
        self._release = weakref.finalize(self, STEP_COUNTER.release)
        self._at_hold = self._at_update = STEP_COUNTER.steps

    def release(self) -> None:
        """Let go of the count (the last holder removes the hook); idempotent."""
        if self._release is not None:
            self._release()

    def seen(self) -> int:
        """The process's optimizer step count now; holds the counter again after a release."""
        if self._release is None or not self._release.alive:
            self.hold()
        return STEP_COUNTER.steps

    def stepped(self, seen: int) -> bool:
        """False when no torch optimizer stepped since the previous :meth:`updated` (and one did since the hold)."""
        return seen == self._at_hold or seen != self._at_update

    def updated(self, seen: int) -> None:
        """Record that an update went ahead at count ``seen``."""
        self._at_update = seen
