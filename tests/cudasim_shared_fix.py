"""Test-only fix for Numba's CUDA simulator: `cuda.shared.array` allocates a block's shared array on first
use with an unlocked check-then-set (FakeCUDAShared.array: get, np.empty, assign). When the GIL switches
between the check and the assignment, two simulated threads of one block get *different* "shared" arrays:
the kernel then sees duplicated candidates or garbage counts (seen here as a rare duplicate row in
sim_ties and a hung bitonic loop in sim_protocol_updates, under load with a short switch interval).
Real GPUs have no such race. Wrapping the allocation in a lock makes the simulator faithful again."""
from __future__ import annotations

import threading


def patch_shared_arrays() -> None:
    import sys
    import traceback

    import numpy as np
    from numba.core import types
    from numba.cuda.simulator import kernelapi
    from numba.np import numpy_support

    shared = kernelapi.FakeCUDAShared
    if getattr(shared, "_streamrec_locked", False):
        return
    dynamic = shared.array
    lock = threading.Lock()

    def array(self, shape, dtype):
        if shape == 0:  # dynamic shared memory: one buffer, nothing to race on
            return dynamic(self, shape, dtype)
        if isinstance(dtype, types.Type):
            dtype = numpy_support.as_dtype(dtype)
        # As the simulator does: an allocation is identified by its caller's file and line; this function is
        # called straight from kernel code, so stack[-2] is that line. Only the check-then-set is locked.
        caller = tuple(traceback.extract_stack(sys._getframe())[-2][0:2])
        with lock:
            found = self._allocations.get(caller)
            if found is None:
                found = self._allocations[caller] = np.empty(shape, dtype)
        return found

    shared.array = array
    shared._streamrec_locked = True
