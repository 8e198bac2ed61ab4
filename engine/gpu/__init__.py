"""GPU backends. Importing this package never raises: `CUDA_AVAILABLE` says whether numba.cuda can be used.

topk.py holds CudaTopK (the backend: host driver), kernels.py its CUDA kernels, device.py the device-resident
item matrix and per-call device buffers. Those import numba.cuda, so only CudaTopK's users import them.

Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1) reports a device, but it runs kernels in Python threads, so
it only counts as available when STREAMREC_ALLOW_CUDASIM=1 asks for it too (the simulator tests do).
"""
from __future__ import annotations

import os

__all__ = ["CUDA_AVAILABLE"]


def _probe() -> bool:
    try:
        from numba import config

        if config.ENABLE_CUDASIM:
            return os.environ.get("STREAMREC_ALLOW_CUDASIM") == "1"
        from numba import cuda
        from numba.cuda.cudadrv import nvvm

        # A device without libNVVM cannot compile the kernels, so it is not usable either.
        return bool(cuda.is_available()) and len(cuda.gpus) > 0 and nvvm.is_available()
    except Exception:  # no driver, broken toolkit, ...: simply no GPU backend
        return False


CUDA_AVAILABLE: bool = _probe()
