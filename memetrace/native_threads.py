"""The native thread pools of the libraries memetrace loads: OpenMP sleeps, BLAS runs on one thread.

Importing this module sets ``OMP_WAIT_POLICY=PASSIVE`` unless set: it must happen before torch
loads OpenMP (``memetrace.embedder`` imports it first). On 2 cores, 2 torch threads beside the 2
decoding/SIFT threads took 5x the CPU spin-waiting (6.3 s vs 1.3 s of CPU for 48 images under
load); passive, they cost 1.2x one thread's CPU.

:func:`single_threaded_blas` sets every OpenBLAS loaded (numpy's, SciPy's, OpenCV's and FAISS's
each bring their own) to one thread. memetrace's matrices are small (a keypoint set against 256
PQ centroids, a descriptor batch) and its parallelism is its own thread pools: BLAS threads only
wake and spin. Measured on 2 cores under load: PQ-coding one image's keypoints took 35-42 ms of
CPU with 2 BLAS threads and 3.5 ms with one, and the streaming ingest's CPU per post fell from 175
to 124 ms (``benchmarks.ingest``, 300 posts). Applied by the composition root
(``memetrace.cli.context``) after it loads a component, undone when it closes.
"""

from __future__ import annotations

import os
from collections.abc import Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

#: set by the user, these win: their value is read by each BLAS when it loads
USER_SETTINGS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")


def single_threaded_blas() -> Callable[[], None]:
    """Every BLAS loaded now to one thread, unless the user set a thread count; returns the undo."""
    if any(os.environ.get(name) for name in USER_SETTINGS):
        return lambda: None
    from threadpoolctl import threadpool_limits

    limits = threadpool_limits(limits=1, user_api="blas")
    return limits.restore_original_limits
