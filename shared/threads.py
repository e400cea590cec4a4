"""Thread defaults that degrade gracefully on a shared machine, set by the console scripts
before torch loads (OpenMP reads its settings once, when torch's first parallel region starts).

Left alone, OpenMP (torch's CPU kernels, and MKL under them) runs one thread per core and
lets a thread that ran out of work spin for a while before it sleeps. With another busy
process on the machine, the spinning threads take the cores the neighbour needs, and every
parallel region waits for its one thread that the kernel descheduled: three fn-train steps on
2 cores took 132 s beside one busy process against 5.5 s with one thread.

So, unless the user set them: `OMP_WAIT_POLICY=PASSIVE` (a thread without work sleeps at
once) and `OMP_NUM_THREADS` = the cores that are free now (measured over a short sample of
/proc/stat, so that a neighbour's work counts but the 1-minute load average's memory of our
own previous command does not). On an idle machine that is every core, as before.

The library applies the same policy for Python callers: the wait policy when `shared` is imported
(`passive_wait_unless_set`), the thread count at the first model load or ICA fit
(`choose_torch_threads`); a command has already chosen both before torch loaded.

And `single_threaded_blas`, numpy's BLAS on one thread around small array work that runs
side by side with other work.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from threadpoolctl import threadpool_limits

SAMPLE_SECONDS = 0.1  # how long the CPU use of the other processes is sampled before the command starts
SAMPLE_WINDOWS = 3  # parts of the sample: a neighbour counts with the least it used in any of them
_chosen: dict[str, str] = {}  # what this package set in the environment, for the --verbose log line
_busy_seen: list[float] = []  # the cores' worth of CPU time other processes used over free_cores's sample
_command_chose = False  # set_thread_defaults ran: a console script, whose --verbose says what it chose
_torch_threads_decided = False  # choose_torch_threads acts once per process

log = logging.getLogger(__name__)


def usable_cores() -> int:
    """The cores this process may run on (its affinity, as under taskset or a container's cpuset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all cores from /proc/stat; None where there is no /proc."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])  # user..steal; guest time is already in user


def free_cores(sample_seconds: float = SAMPLE_SECONDS) -> int:
    """The cores other processes leave free now (at least 1): the usable cores less the cores'
    worth of CPU time the machine spent busy over a short sample, while this process slept.

    The sample is cut in SAMPLE_WINDOWS and the busy cores are the fewest of any window: a process
    that keeps a core busy keeps it busy in each, while a burst (a shell starting, the end of the
    command before in a chain) fills one window at most and would otherwise cost the whole run a
    thread."""
    cores = usable_cores()
    before = _cpu_times()
    if before is None:
        return cores
    busy = float("inf")
    for _ in range(SAMPLE_WINDOWS):
        time.sleep(sample_seconds / SAMPLE_WINDOWS)
        after = _cpu_times()
        if after is None:
            return cores
        if after[1] > before[1]:  # the clock ticked over the window
            busy = min(busy, (after[0] - before[0]) / (after[1] - before[1]) * (os.cpu_count() or cores))
            before = after
    if busy == float("inf"):
        return cores
    _busy_seen[:] = [busy]
    return max(1, min(cores, cores - round(busy)))


def _free_cores_why(count: int, before: str) -> str:
    """Why free_cores gave `count`: what it saw the other processes use."""
    if not _busy_seen:
        return f"{count} of {usable_cores()} usable cores: no /proc/stat to read"
    busy = f"other processes kept {_busy_seen[0]:.1f} cores busy throughout the {SAMPLE_SECONDS:g} s before {before}"
    return f"{count} of {usable_cores()} usable cores free: {busy}"


def set_thread_defaults(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Set OMP_WAIT_POLICY and OMP_NUM_THREADS in `environ` (default the process's) where the
    user has not; return what was set. Call before torch (or numpy) is imported."""
    global _command_chose
    _command_chose = True
    environ = os.environ if environ is None else environ
    chosen = {}
    if "OMP_WAIT_POLICY" not in environ:
        chosen["OMP_WAIT_POLICY"] = "PASSIVE"
    if "OMP_NUM_THREADS" not in environ:
        chosen["OMP_NUM_THREADS"] = str(free_cores())
    environ.update(chosen)
    _chosen.update(chosen)
    return chosen


def passive_wait_unless_set(environ: dict[str, str] | None = None) -> None:
    """Set OMP_WAIT_POLICY=PASSIVE where the user has not, if torch is not loaded yet.

    Called when `shared` is imported: libgomp reads its environment once, when the library is
    loaded (with torch), so this is the last moment a Python caller's process can still get it. A
    process that imported torch first keeps libgomp's spinning wait; `choose_torch_threads` says so.
    """
    environ = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" not in environ and "torch" not in sys.modules:
        environ["OMP_WAIT_POLICY"] = _chosen["OMP_WAIT_POLICY"] = "PASSIVE"


def torch_default_threads() -> int:
    """The intra-op thread count torch takes when nobody sets one (its MKL/OpenMP builds): the
    physical cores among the usable ones (hyper-threads of one core count once)."""
    cores = set()
    for cpu in os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else ():
        topology = f"/sys/devices/system/cpu/cpu{cpu}/topology"
        try:
            with open(f"{topology}/physical_package_id") as package, open(f"{topology}/core_id") as core:
                cores.add((package.read().strip(), core.read().strip()))
        except OSError:
            return usable_cores()
    return len(cores) or usable_cores()


def choose_torch_threads() -> None:
    """The commands' thread count for a Python caller: torch's intra-op threads set to the cores
    free now, at the first model load or ICA fit of the process (later calls do nothing, so a
    session's results do not change with its neighbours), and said at INFO on this logger.

    What the user chose is left alone: OMP_NUM_THREADS or MKL_NUM_THREADS in the environment, or
    a torch.set_num_threads call, seen as a count other than torch's own default
    (`torch_default_threads`). A call that asks for exactly that default cannot be told from no
    call: set OMP_NUM_THREADS to keep every core whatever the neighbours do.
    """
    global _torch_threads_decided
    if _torch_threads_decided:
        return
    _torch_threads_decided = True
    if _command_chose:  # a console script set (or left the user's) OMP_NUM_THREADS; its --verbose says so
        return
    import torch

    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if name in os.environ:
            log.info(
                "threads: %s=%s set by you, left as it is (%d torch threads)",
                name,
                os.environ[name],
                torch.get_num_threads(),
            )
            return
    current = torch.get_num_threads()
    if current != torch_default_threads():
        log.info("threads: torch.set_num_threads(%d) set by you, left as it is", current)
        return
    free = free_cores()
    torch.set_num_threads(free)
    policy = os.environ.get("OMP_WAIT_POLICY")
    if policy is not None:
        wait = f"; OMP_WAIT_POLICY={policy}"
    elif free > 1:  # passive_wait_unless_set came after torch
        wait = (
            "; idle OpenMP threads spin before they sleep (torch was imported before this package: import "
            "shared, fn_analyze or fn_train first, or set OMP_WAIT_POLICY=PASSIVE, for threads that sleep at once)"
        )
    else:
        wait = ""
    log.info(
        "threads: %d torch threads (%s)%s; set OMP_NUM_THREADS or call torch.set_num_threads before loading to choose",
        free,
        _free_cores_why(free, "the first model load or fit"),
        wait,
    )


def thread_note(environ: dict[str, str] | None = None) -> str | None:
    """A line saying how many threads the command took and why, and the wait policy (`environ`, default
    the process's, as set_thread_defaults left it); None in a process where no command chose (a Python
    caller's choice is logged by `choose_torch_threads`)."""
    if not _command_chose:
        return None
    environ = os.environ if environ is None else environ
    count = environ.get("OMP_NUM_THREADS")
    why = _free_cores_why(int(count), "the start") if "OMP_NUM_THREADS" in _chosen else "set by you"
    policy = environ.get("OMP_WAIT_POLICY")
    wait = f"OMP_WAIT_POLICY={policy}" + ("" if "OMP_WAIT_POLICY" in _chosen else " (set by you)")
    return f"threads: OMP_NUM_THREADS={count} ({why}); {wait}; set these variables yourself to choose"


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """numpy's BLAS (OpenBLAS) on one thread for the block.

    The arrays numpy works on in the ICA are small (a QR of neurons x 2k, the ICA runs on
    neurons x k), and OpenBLAS's own threads, waking for each of them, fight torch's OpenMP
    threads (which spin after every product) and each other for the cores: on the 2-core
    machine one Picard run on the bench's 2,048 x 32 maps took 3.3 s with OpenBLAS's 2
    threads and 0.05 s with one, with bit-identical results (one thread computes each output
    element either way). Parallelism comes from running independent work side by side instead.
    """
    with threadpool_limits(limits=1, user_api="blas"):
        yield
