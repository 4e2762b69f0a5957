"""`volscan extract` on a local Ray cluster with two workers (the `ray` extra; CI installs it).

One small local cluster for the module (2 CPUs = two one-CPU workers, 200 MB object store, no
dashboard). Checked: scores.csv byte-identical to the single-process `volscan screen`, each
worker builds the backbone once, and a worker killed in the middle of a token job is replaced
and the run still completes with the same scores.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import ray
from test_extract_score import cohort, config_for, score, subjects_of  # noqa: F401  (cohort is a fixture)

from pipelines.distributed.extract import ExtractResult, ExtractSettings, run_extract
from pipelines.distributed.runners import RaySettings

TOKENS_TASK = "ray::volscan-tokens"  # the process title of a worker while it runs a token job


@pytest.fixture(scope="module")
def cluster() -> None:
    ray.init(num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def extract_on_ray(cohort: dict, cache: Path) -> ExtractResult:
    settings = ExtractSettings(ray=RaySettings(max_retries=2), progress=False)
    return run_extract(subjects_of(cohort), config_for(cohort, cache), settings)


def test_two_ray_workers_give_the_single_process_scores(cluster: None, cohort: dict) -> None:  # noqa: F811
    cache = cohort["root"] / "cache-ray"
    result = extract_on_ray(cohort, cache)
    assert not result.failed and result.computed == len(cohort["ids"])
    # Two worker processes shared the scans, and each built the backbone exactly once.
    assert len(result.workers) == 2 and set(result.workers.values()) == {1}
    assert os.getpid() not in result.workers
    assert score(cohort, cache, "ray") == cohort["reference"]


def test_run_survives_a_killed_worker(cluster: None, cohort: dict) -> None:  # noqa: F811
    cache = cohort["root"] / "cache-ray-kill"
    outcome: dict = {}
    run = threading.Thread(target=lambda: outcome.update(result=extract_on_ray(cohort, cache)))
    run.start()
    killed = None
    while run.is_alive() and killed is None:
        for process in psutil.process_iter(["pid", "name"]):
            if process.info["name"] == TOKENS_TASK:
                os.kill(process.info["pid"], signal.SIGKILL)  # as the OOM killer or a lost node would
                killed = process.info["pid"]
                break
        time.sleep(0.02)
    run.join(timeout=120)
    assert killed is not None, "no token job was seen running"
    result = outcome["result"]
    # The killed job was rerun on another worker (which finds the tokens cached if the kill came
    # after the write).
    assert not result.failed and result.computed >= len(cohort["ids"]) - 1
    assert score(cohort, cache, "ray-kill") == cohort["reference"]


@pytest.mark.parametrize(("resources", "missing"), [({"gpus_per_scan": 1.0}, "1 GPU(s) per scan but its nodes have at most 0"),
                                                    ({"cpus_per_scan": 8.0}, "8 CPU(s) per scan but its nodes have at most 2")])
def test_a_task_no_node_can_run_is_refused_at_once(cluster: None, cohort: dict, resources: dict, missing: str,  # noqa: F811
                                                   tmp_path: Path) -> None:
    """Ray keeps an infeasible task pending for ever (`--ray-gpus-per-scan 1` on a cluster
    without GPUs waited until killed): refused before any task, and the part's previous error
    log is left as it was."""
    from volumetric.errors import VolscanError

    cache = tmp_path / "cache"
    settings = ExtractSettings(ray=RaySettings(**resources), progress=False)
    with pytest.raises(VolscanError, match=re.escape(missing)):
        run_extract(subjects_of(cohort), config_for(cohort, cache), settings)
    assert not list(cache.rglob("errors-*.jsonl"))
