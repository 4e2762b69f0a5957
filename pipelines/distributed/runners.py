"""Where per-scan jobs run: in this process (`LocalRunner`) or as Ray tasks (`RayRunner`).

Both are context managers with `map(plan, subjects, phase)` yielding one `ScanOutcome` per
subject in completion order. Ray is imported only when a `RayRunner` is entered, so plain local
runs never load it (nor need it installed: it is the optional extra `volscan[ray]`, which
installs `ray[client]` so that `ray://` addresses work).

Nothing waits on Ray without a deadline: before `ray.init` the cluster's address must answer a
TCP connection within `CONNECT_TIMEOUT_S` (Ray itself retries an unreachable address for
minutes), and before any task is submitted some alive node must hold the CPUs and GPUs one
scan's task asks for (Ray would keep an infeasible task pending for ever). A local cluster
started here is shut down on the way out. On Ctrl-C and SIGTERM (`ray.init` installs its own
SIGTERM handler; volscan's is put back, so SIGTERM unwinds through `__exit__`) volscan's own
cleanup runs, the process ends at once, and the watcher process that also covers `kill -9`
(`pipelines.distributed.reaper`) stops the cluster: Ray's in-process teardown is what crashed then.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from pipelines.distributed.per_scan import ScanOutcome, ScanPlan, run_scan
from pipelines.distributed.reaper import Reaper
from pipelines.failures import EXIT_INTERRUPTED, EXIT_TERMINATED, Terminated
from pipelines.subjects import Subject
from volumetric.errors import VolscanError, first_line

# "1" when Ray is imported: no C++ failure-signal handler in the driver (see `_import_ray`).
_RAY_FAILURE_HANDLER_ENV = "RAY_DISABLE_FAILURE_SIGNAL_HANDLER"
# Seconds the cluster's address has to accept a TCP connection.
CONNECT_TIMEOUT_S = 10.0
# What a signal raises in the main thread: SIGTERM (volscan's handler) and Ctrl-C.
SIGNALLED = (Terminated, KeyboardInterrupt)
CLIENT_SCHEME = "ray://"


@dataclass(frozen=True)
class RaySettings:
    """How per-scan jobs use a Ray cluster.

    - `address`: an existing cluster ("auto", "ray://host:10001", "host:6379"); None starts a
      local cluster for this run (stopped at the end).
    - `cpus_per_scan`, `gpus_per_scan`: Ray resources of one scan's task (None = 1 GPU when the
      cluster has GPUs and the device is not "cpu", else 0). A worker's torch uses
      `cpus_per_scan` threads (Ray sets OMP_NUM_THREADS from it).
    - `max_retries`: times a scan's task is restarted after its worker died (node lost,
      out-of-memory kill, ...); errors raised by the scan itself are not retried: they go to
      the error log.
    - `local_cpus`: CPUs of a local cluster (None = all of this machine); with
      `cpus_per_scan=1` it is the number of concurrent workers. `object_store_mb`: the local
      cluster's object store; only small plans and outcomes travel through it (results are
      files), so 256 MB is plenty.
    """

    address: str | None = None
    cpus_per_scan: float = 1.0
    gpus_per_scan: float | None = None
    max_retries: int = 3
    local_cpus: int | None = None
    object_store_mb: int = 256

    def __post_init__(self) -> None:
        if not self.cpus_per_scan > 0:
            raise VolscanError(f"Ray CPUs per scan must be > 0, got {self.cpus_per_scan}")
        if self.gpus_per_scan is not None and self.gpus_per_scan < 0:
            raise VolscanError(f"Ray GPUs per scan must be >= 0, got {self.gpus_per_scan}")
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise VolscanError(f"Ray max retries must be an integer >= 0, got {self.max_retries!r}")
        if self.local_cpus is not None and self.local_cpus < 1:
            raise VolscanError(f"local Ray CPUs must be >= 1, got {self.local_cpus}")
        if self.object_store_mb < 100:
            raise VolscanError(f"Ray object store must be >= 100 MB, got {self.object_store_mb}")


class LocalRunner:
    """Runs the jobs one after the other in this process (the backbone stays loaded between scans)."""

    name = "local"

    def __enter__(self) -> "LocalRunner":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def check_feasible(self, plan: ScanPlan) -> None:
        """This process runs every job it is given."""

    def map(self, plan: ScanPlan, subjects: Sequence[Subject], phase: str) -> Iterator[ScanOutcome]:
        """One outcome per subject, in order."""
        for subject in subjects:
            yield run_scan(plan, subject, phase)


class RayRunner:
    """Runs one Ray task per scan on the cluster of `settings` (see `RaySettings`)."""

    name = "ray"

    def __init__(self, settings: RaySettings) -> None:
        self.settings = settings
        self._started = False
        self._ray: Any = None
        self._reaper = Reaper()

    def __enter__(self) -> "RayRunner":
        try:
            ray = _import_ray()
        except ImportError:
            raise VolscanError("--ray needs Ray: pip install 'volscan[ray]'") from None
        self._ray = ray
        if not ray.is_initialized():
            try:
                with _own_sigterm_handler():
                    self._init(ray)
            except BaseException:  # refused, interrupted or terminated half-way: stop what started
                ray.shutdown()
                self._reaper.stop()
                raise
        return self

    def _init(self, ray: Any) -> None:
        """Start a local cluster or connect to `settings.address` (see the module docstring)."""
        s = self.settings
        if s.address is None:
            if s.gpus_per_scan:  # a local cluster has this machine's GPUs: answer before starting it
                import torch

                if torch.cuda.device_count() < s.gpus_per_scan:
                    raise VolscanError(f"Ray GPUs per scan {s.gpus_per_scan:g}: this machine has "
                                       f"{torch.cuda.device_count()} GPU(s) for its local Ray cluster; use "
                                       "--ray-gpus-per-scan 0 or a cluster with GPUs")
            self._reaper.start()  # stops the cluster should this process be killed outright, even mid-start
            try:
                ray.init(num_cpus=s.local_cpus, object_store_memory=s.object_store_mb * 2**20,
                         include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
            except (ConnectionError, ValueError, RuntimeError, OSError) as exc:
                raise VolscanError(f"cannot start a local Ray cluster: {first_line(exc)}") from None
        else:
            check_reachable(s.address)
            try:
                ray.init(address=s.address, log_to_driver=False, logging_level=logging.WARNING)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise VolscanError(f"cannot connect to the Ray cluster at {s.address!r}: {first_line(exc)}") from None
        self._started = True

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if not self._started:
            return
        self._started = False
        signalled = exc_type is not None and issubclass(exc_type, SIGNALLED)
        if signalled and self.settings.address is None:
            # Stopped by a signal with a local cluster: Ray's in-process teardown (cancelling
            # running tasks, `ray.shutdown`, the interpreter's finalisation) crashed the driver in
            # about 1 of 3 SIGTERMs mid-run (SIGSEGV or a failed Ray check instead of exit 143).
            # So Ray is left as it is: volscan's own cleanup runs as the exception unwinds, then
            # this handler (registered last, so run first at exit) ends the process, and the
            # watcher, seeing it gone, kills the cluster's processes.
            atexit.register(_exit_at_once, EXIT_TERMINATED if issubclass(exc_type, Terminated) else EXIT_INTERRUPTED)
            return
        self._ray.shutdown()
        self._reaper.stop()

    def gpus_per_scan(self, plan: ScanPlan) -> float:
        """The GPUs one scan's task asks for (see `RaySettings.gpus_per_scan`)."""
        if self.settings.gpus_per_scan is not None:
            return self.settings.gpus_per_scan
        has_gpus = self._ray.cluster_resources().get("GPU", 0) > 0
        return 1.0 if has_gpus and plan.device != "cpu" else 0.0

    def check_feasible(self, plan: ScanPlan) -> None:
        """Refuse a scan's task that no alive node of the cluster can run (its CPUs and GPUs):
        Ray would keep it pending for ever. One line naming the address and what is missing."""
        cpus, gpus = self.settings.cpus_per_scan, self.gpus_per_scan(plan)
        nodes = [node.get("Resources", {}) for node in self._ray.nodes() if node.get("Alive")]
        if any(node.get("CPU", 0) >= cpus and node.get("GPU", 0) >= gpus for node in nodes):
            return
        where = f"at {self.settings.address!r}" if self.settings.address else "started on this machine"
        most_gpus = max((node.get("GPU", 0) for node in nodes), default=0)
        most_cpus = max((node.get("CPU", 0) for node in nodes), default=0)
        missing = (f"{gpus:g} GPU(s) per scan but its nodes have at most {most_gpus:g} GPU(s)" if most_gpus < gpus
                   else f"{cpus:g} CPU(s) per scan but its nodes have at most {most_cpus:g} CPU(s)")
        raise VolscanError(f"the Ray cluster {where} cannot run a scan's task: it asks for {missing} "
                           "(see --ray-gpus-per-scan / --ray-cpus-per-scan)")

    def map(self, plan: ScanPlan, subjects: Sequence[Subject], phase: str) -> Iterator[ScanOutcome]:
        """One outcome per subject, in completion order; a task that failed for good (its worker
        died more than `max_retries` times) comes back as a failed outcome, not an exception."""
        ray = self._ray
        self.check_feasible(plan)
        task = ray.remote(run_scan).options(
            num_cpus=self.settings.cpus_per_scan, num_gpus=self.gpus_per_scan(plan),
            max_retries=self.settings.max_retries, retry_exceptions=False, name=f"volscan-{phase}",
        )
        plan_ref = ray.put(plan)  # shipped to the object store once, not once per task
        pending = {task.remote(plan_ref, subject, phase): subject for subject in subjects}
        try:
            while pending:
                with _signals_raised_in_ray():
                    done, _ = ray.wait(list(pending), num_returns=1)
                subject = pending.pop(done[0])
                try:
                    with _signals_raised_in_ray():
                        outcome = ray.get(done[0])
                except ray.exceptions.RayError as exc:
                    text = str(exc).strip().splitlines()
                    outcome = ScanOutcome(subject.id, str(subject.image), phase,
                                          error=f"Ray: {text[0] if text else exc!r}", error_type=type(exc).__name__)
                yield outcome
        except SIGNALLED:
            # A local cluster is stopped whole, by its watcher, once this process has ended (see
            # `__exit__`); Ray's in-process teardown is what crashes mid-task.
            if self.settings.address is not None:
                self._cancel(pending)
            raise
        except BaseException:  # the caller stopped early or a scan's outcome failed
            self._cancel(pending)
            raise

    def _cancel(self, pending: dict[Any, Subject]) -> None:
        """Cancel the tasks still pending: do not leave them running on the cluster."""
        for ref in pending:
            self._ray.cancel(ref, force=True)


@contextmanager
def _signals_raised_in_ray() -> Iterator[None]:
    """Ray's blocking calls (`ray.wait`, `ray.get`) check for signals inside their C++ code; the
    exception a Python handler raises there (volscan's `Terminated`, Ctrl-C's KeyboardInterrupt)
    comes back as a SystemError caused by it. Raise it as itself, so that SIGTERM mid-run ends
    with exit 143 and one line, not a traceback."""
    try:
        yield
    except SystemError as exc:
        if isinstance(exc.__cause__, SIGNALLED):
            raise exc.__cause__ from None
        raise


def _exit_at_once(code: int) -> None:
    """Flush what was printed and logged, then end the process with `code`, skipping the rest of
    the interpreter's finalisation (see `RayRunner.__exit__`)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken: nothing left to save
            pass
    os._exit(code)


def _import_ray() -> Any:
    """`import ray` without Ray's C++ failure-signal handler in this (the driver's) process.

    That handler (absl), installed when the driver's core worker starts, also catches SIGTERM
    and ends the process with SIGABRT or SIGSEGV after volscan's own handler has run (exit -6 or
    -11 instead of 143). Ray reads its switch once, at import, from the environment; the
    variable is set only for the import, so Ray's other processes keep their handler. A program
    that imported Ray before keeps the handler; a value the user set is kept.
    """
    if "ray" in sys.modules or _RAY_FAILURE_HANDLER_ENV in os.environ:
        import ray

        return ray
    os.environ[_RAY_FAILURE_HANDLER_ENV] = "1"
    try:
        import ray
    finally:
        del os.environ[_RAY_FAILURE_HANDLER_ENV]
    return ray


@contextmanager
def _own_sigterm_handler() -> Iterator[None]:
    """Keep this process's SIGTERM handler across `ray.init`, which replaces it with one that
    calls `sys.exit` (volscan's raises `Terminated`: exit 143, one line, Ray shut down)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    try:
        yield
    except SystemExit as exc:
        if exc.code != signal.SIGTERM:
            raise
        raise Terminated() from None  # SIGTERM came while Ray's handler was in place
    finally:
        signal.signal(signal.SIGTERM, previous)


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Refuse a Ray `address` ("auto", "HOST:PORT", "ray://HOST:PORT") whose host does not
    accept a TCP connection within `timeout_s`, with one line naming it; `ray://` also needs
    Ray's client (grpcio)."""
    target = address
    if address.startswith(CLIENT_SCHEME):
        try:
            import grpc  # noqa: F401  (what `ray[client]` adds)
        except ImportError:
            raise VolscanError(f"Ray address {address!r} needs Ray's client: pip install 'volscan[ray]' "
                               "(it installs ray[client])") from None
        target = address[len(CLIENT_SCHEME):]
    elif address == "auto":
        from ray._private.services import canonicalize_bootstrap_address  # how ray.init reads "auto"

        try:
            target = canonicalize_bootstrap_address(address)
        except (ConnectionError, ValueError) as exc:
            raise VolscanError(f"Ray address 'auto': {first_line(exc)}") from None
        if target is None:
            raise VolscanError("Ray address 'auto': no running Ray cluster found on this machine "
                               "(start one with `ray start --head`, or give its address)")
    host, _, port = target.rpartition(":")
    host = host.strip("[]")  # IPv6 literals
    if not host or not port.isdigit():
        raise VolscanError(f"Ray address {address!r} is not HOST:PORT, ray://HOST:PORT or auto")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        reason = "no answer" if isinstance(exc, TimeoutError) else exc.strerror or type(exc).__name__
        raise VolscanError(f"cannot connect to the Ray cluster at {address!r}: nothing accepts connections at "
                           f"{host}:{port} within {timeout_s:g} s ({reason}); is its head node running?") from None
