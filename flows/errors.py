"""The errors specific to flows: a clean-up that could not give back what a run held.

Each is permanent (a retry would not fix it): the message says what is left up and what to run.
"""

from __future__ import annotations

from coder_stack.errors import PermanentError


class ReleaseIncomplete(PermanentError):
    """A clean-up scale-down was not confirmed, or the pods stayed: the model may still hold the GPU."""


class CleanupIncomplete(PermanentError):
    """A dead run's model could not be scaled down (its pods are still there)."""


class ReclaimIncomplete(PermanentError):
    """An idle model's scale-down was not confirmed (its pods are still there)."""


class TeardownIncomplete(PermanentError):
    """Something is still running after the teardown."""


class WakeGaveUp(PermanentError):
    """A wake waited ``wake.wait_for_gpu_s`` for the GPU and the model in use stayed in use (it is never evicted)."""


class WakeTakenOver(PermanentError):
    """This wake's claim on the model was taken over or removed while it ran (it no longer owns the model)."""
