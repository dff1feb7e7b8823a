"""Wall-clock readings that cover the device's work: every reported time in crop is read through :func:`clock`.

CUDA (and MPS) run kernels asynchronously: a plain ``time.perf_counter()`` after a call may be
read while its kernels are still queued, so it times the launch, not the work. :func:`clock`
waits for the queued work first (:func:`crop.models.loading.synchronize`; a no-op on the CPU).
"""

from __future__ import annotations

import time

from crop.models.loading import synchronize


def clock() -> float:
    """``time.perf_counter()`` once every device's queued work is done."""
    synchronize()
    return time.perf_counter()
