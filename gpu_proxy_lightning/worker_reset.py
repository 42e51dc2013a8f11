"""What torch and Lightning keep per process, put back in a pooled worker after each run.

A warm worker serves many runs (:mod:`gpu_proxy.runs.pool`); a run must find what a fresh process
has: unseeded random generators, float32 as the default dtype, autograd on, the default matmul
precision, no process group, no cached CUDA blocks of the run before.
"""
from __future__ import annotations

import torch

from gpu_proxy.runs.process_state import register_reset

_DEFAULT_MATMUL_PRECISION = torch.get_float32_matmul_precision()
_DEFAULT_THREADS = torch.get_num_threads()


def reset_torch() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    torch.seed()  # from the OS's entropy, on every device, as a fresh process
    try:
        import numpy

        numpy.random.seed()
    except ImportError:
        pass
    torch.set_default_dtype(torch.float32)
    torch.set_grad_enabled(True)
    torch.set_float32_matmul_precision(_DEFAULT_MATMUL_PRECISION)
    torch.set_num_threads(_DEFAULT_THREADS)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


register_reset(reset_torch)
