"""The size of TVM's CPU thread pool, which every compiled module of a process shares."""
from __future__ import annotations

from legoc.errors import UserError


def set_num_threads(num_threads: int) -> None:
    """Threads of TVM's CPU thread pool for every compiled module of this process (the run-time
    form of ``TVM_NUM_THREADS``; the parallel loops of legoc's CPU schedules use this pool)."""
    if not isinstance(num_threads, int) or num_threads < 1:
        raise UserError(f"num_threads must be a positive integer, got {num_threads!r}")
    import tvm

    # affinity mode 1 ("big cores": every core on a homogeneous CPU), as TVM's own start-up
    tvm.get_global_func("runtime.config_threadpool")(1, num_threads)
    if int(tvm.get_global_func("runtime.NumThreads")()) != num_threads:
        raise UserError(f"TVM's thread pool has {int(tvm.get_global_func('runtime.NumThreads')())} threads and "
                        f"cannot grow to {num_threads} once started; set TVM_NUM_THREADS={num_threads} in the "
                        "environment before the process starts")
