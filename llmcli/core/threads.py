"""How many CPU threads the model math uses: the physical cores by default, or --threads.

Hyper-threads share one core's arithmetic units, and a process that asks for more threads than
it has cores pays for it badly: on a busy 2-core machine a 2-thread torch op ran 16x slower
than a 1-thread one. So the default is the physical cores this process may run on, not the
logical CPUs that torch counts.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SYS_CPU = Path("/sys/devices/system/cpu")


def physical_cores(sys_cpu: Path = SYS_CPU, cpus: set[int] | None = None) -> int:
    """Distinct (package, core) pairs among the CPUs this process may run on (its affinity).

    Read from sys_cpu/cpuN/topology/{physical_package_id,core_id}; os.cpu_count() (or the
    affinity's size) where the topology cannot be read.
    """
    if cpus is None:
        try:
            cpus = set(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # not Linux
            return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        topology = sys_cpu / f"cpu{cpu}" / "topology"
        try:
            package = (topology / "physical_package_id").read_text().strip()
            core = (topology / "core_id").read_text().strip()
        except OSError:
            return len(cpus) or os.cpu_count() or 1
        cores.add((package, core))
    return len(cores) or os.cpu_count() or 1


def apply_threads(threads: int | None) -> int:
    """Put --threads (None: the physical cores) into effect before the model runs; returns the count."""
    from llmcli.errors import UsageError

    if threads is not None and threads < 1:
        raise UsageError(f"--threads {threads} is below 1", "use --threads 1 or more, or leave it out for the physical cores")
    count = physical_cores() if threads is None else threads
    use_threads(count)
    return count


def use_threads(n: int) -> None:
    """Run torch and the native kernels on n threads (every later op, from any thread)."""
    import torch

    from llmcli.core import kernels

    torch.set_num_threads(n)
    kernels.set_threads(n)


@contextmanager
def serial_torch_ops() -> Iterator[None]:
    """torch ops inside run on the calling thread alone; the native kernels keep their count.

    For the small ops around a forward (sampling over a vocabulary, bookkeeping) and a native
    decode step: torch runs an op above 32768 values on its OpenMP team, whose threads then spin
    for milliseconds (libgomp's default wait policy) on the cores the next native kernels' task
    pool needs. Setting the counts costs a fraction of a microsecond (no threads are created or
    stopped). Kernels that follow OpenMP's count (no --threads) are held at torch's meanwhile."""
    import torch

    from llmcli.core import kernels

    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    follows_openmp = kernels.explicit_threads() == 0
    if follows_openmp:
        kernels.set_threads(threads)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if follows_openmp:
            kernels.set_threads(0)
