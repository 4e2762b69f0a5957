"""Where per-scan jobs run: in this process (`LocalRunner`) or as Ray tasks (`RayRunner`).

Both are context managers with `map(plan, subjects, phase)` yielding one `ScanOutcome` per
subject in completion order. Ray is imported only when a `RayRunner` is entered, so plain local
runs never load it (nor need it installed: it is the optional extra `volscan[ray]`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from pipelines.distributed.per_scan import ScanOutcome, ScanPlan, run_scan
from pipelines.inputs import Subject
from volumetric.errors import VolscanError, first_line


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

    def __enter__(self) -> "RayRunner":
        try:
            import ray
        except ImportError:
            raise VolscanError("--ray needs Ray: pip install 'volscan[ray]'") from None
        self._ray = ray
        if not ray.is_initialized():
            s = self.settings
            if s.address is None:
                try:
                    ray.init(num_cpus=s.local_cpus, object_store_memory=s.object_store_mb * 2**20,
                             include_dashboard=False, log_to_driver=False)
                except (ConnectionError, ValueError, RuntimeError, OSError) as exc:
                    raise VolscanError(f"cannot start a local Ray cluster: {first_line(exc)}") from None
            else:
                try:
                    ray.init(address=s.address, log_to_driver=False)
                except (ConnectionError, ValueError, RuntimeError) as exc:
                    raise VolscanError(f"cannot connect to the Ray cluster at {s.address!r}: {first_line(exc)}") from None
            self._started = True
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._started:
            self._ray.shutdown()
            self._started = False

    def gpus_per_scan(self, plan: ScanPlan) -> float:
        """The GPUs one scan's task asks for (see `RaySettings.gpus_per_scan`)."""
        if self.settings.gpus_per_scan is not None:
            return self.settings.gpus_per_scan
        has_gpus = self._ray.cluster_resources().get("GPU", 0) > 0
        return 1.0 if has_gpus and plan.config.device != "cpu" else 0.0

    def map(self, plan: ScanPlan, subjects: Sequence[Subject], phase: str) -> Iterator[ScanOutcome]:
        """One outcome per subject, in completion order; a task that failed for good (its worker
        died more than `max_retries` times) comes back as a failed outcome, not an exception."""
        ray = self._ray
        task = ray.remote(run_scan).options(
            num_cpus=self.settings.cpus_per_scan, num_gpus=self.gpus_per_scan(plan),
            max_retries=self.settings.max_retries, retry_exceptions=False, name=f"volscan-{phase}",
        )
        plan_ref = ray.put(plan)  # shipped to the object store once, not once per task
        pending = {task.remote(plan_ref, subject, phase): subject for subject in subjects}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                subject = pending.pop(done[0])
                try:
                    yield ray.get(done[0])
                except ray.exceptions.RayError as exc:
                    text = str(exc).strip().splitlines()
                    yield ScanOutcome(subject.id, str(subject.image), phase, error=f"Ray: {text[0] if text else exc!r}",
                                      error_type=type(exc).__name__)
        finally:
            for ref in pending:  # interrupted: do not leave tasks running on the cluster
                ray.cancel(ref, force=True)
