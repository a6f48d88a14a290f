"""Cohort executors on Dask: same maps and metrics as inline; a dead worker costs only its job."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import dask
import nibabel as nib
import numpy as np
import pytest

from cohort_helpers import cohort_data, write_phantoms
from esegeta_engine.cohort import parse_cohort_config, run_cohort
from esegeta_engine.jobs.worker import TRACE_ENV


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A LocalCluster started by the test, reached only through its address (2 processes, 1 thread)."""
    from distributed import LocalCluster

    trace = tmp_path_factory.mktemp("trace")
    old = os.environ.get(TRACE_ENV)
    os.environ[TRACE_ENV] = str(trace)  # inherited by the worker processes spawned now
    try:
        with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
            c = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
        yield c, trace
        c.close()
    finally:
        if old is None:
            os.environ.pop(TRACE_ENV, None)
        else:
            os.environ[TRACE_ENV] = old


def _results(out: Path) -> dict[str, tuple[np.ndarray, dict]]:
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    return {r["key"]: (np.asarray(nib.load(str(out / r["file"])).dataobj), r["metrics"])
            for r in manifest["results"]}


@pytest.mark.slow  # starts a second cluster, 36 jobs (2 subjects: every executor still gets both models)
def test_inline_local_and_dask_give_identical_maps_and_metrics(tmp_path, cluster):
    write_phantoms(tmp_path / "data", n=2)
    rows = ["volume,ground_truth"] + [f"data/sub{i:02d}.nii.gz,data/sub{i:02d}_gt.nii.gz" for i in range(2)]
    (tmp_path / "c.csv").write_text("\n".join(rows) + "\n")
    data = cohort_data(tmp_path)
    data["cohort"] = {"csv": str(tmp_path / "c.csv")}
    data["evaluation"] = {"infidelity": {"n_perturb_samples": 2}}  # seeded: must agree across processes
    runs = {}
    for kind in ("inline", "local", "dask"):
        d = {**data, "output": {"dir": str(tmp_path / kind)},
             "cohort": {**data["cohort"], "workers": 2, "scheduler": cluster[0].scheduler_address}}
        result = run_cohort(parse_cohort_config(d), executor=kind)
        assert not result.failed and len(result.records) == 12
        runs[kind] = _results(tmp_path / kind)
        workers = {r["worker"] for r in result.records}
        assert len(workers) == (1 if kind == "inline" else 2), workers  # both workers took jobs
    for kind in ("local", "dask"):
        assert runs[kind].keys() == runs["inline"].keys()
        for key, (arr, metrics) in runs["inline"].items():
            np.testing.assert_array_equal(runs[kind][key][0], arr)
            other = runs[kind][key][1]
            assert other.keys() == metrics.keys() and "infidelity" in metrics and "mass_inside" in metrics
            for name, value in metrics.items():
                # the maps are bit-identical; a score the completeness check evaluates afresh can differ in
                # its last bits between processes with other thread counts (oneDNN reductions): 1e-4 there
                if isinstance(value, float):
                    assert other[name] == pytest.approx(value, rel=1e-4, abs=1e-9), name
                else:
                    assert other[name] == value, name
    # aggregates too
    for name in ("aggregate/base/saliency__argmax-1__mean.nii.gz", "compare/base-vs-tuned/saliency__argmax-1__mean-diff.nii.gz"):
        ref = np.asarray(nib.load(str(tmp_path / "inline" / name)).dataobj)
        for kind in ("local", "dask"):
            np.testing.assert_array_equal(np.asarray(nib.load(str(tmp_path / kind / name)).dataobj), ref)


def test_killing_a_worker_mid_run_retries_only_its_job(tmp_path, cluster):
    c, trace = cluster
    for p in trace.iterdir():
        p.unlink()
    write_phantoms(tmp_path / "data")
    data = cohort_data(tmp_path)
    data["models"] = data["models"][:1]
    data["methods"] = [{"name": "occlusion", "params": {"window": 4, "stride": 4, "perturbations_per_eval": 1}}]
    data["cohort"] = {**data["cohort"], "executor": "dask", "scheduler": c.scheduler_address}
    killed: list[int] = []

    def kill_first_busy_worker() -> None:
        deadline = time.time() + 120
        while time.time() < deadline:
            started = list(trace.iterdir())
            if started:
                pid = int(started[0].name.split(".")[1])
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_first_busy_worker)
    killer.start()
    result = run_cohort(parse_cohort_config(data))
    killer.join()
    assert killed and result.status == "completed" and len(result.records) == 4 and not result.failed
    starts: dict[str, list[int]] = {}
    for p in trace.iterdir():
        key, pid, _ = p.name.split(".")
        starts.setdefault(key, []).append(int(pid))
    retried = {k: pids for k, pids in starts.items() if len(pids) > 1}
    assert len(retried) == 1, starts  # the killed worker's job, and no other, ran twice
    [(key, pids)] = retried.items()
    assert killed[0] in pids and len(set(pids)) == 2
    assert all(len(v) == 1 for k, v in starts.items() if k != key) and len(starts) == 4
    assert killed[0] not in {int(r["worker"].split(":")[1]) for r in result.records}


def test_a_job_whose_worker_dies_twice_is_recorded_failed_and_the_run_goes_on(tmp_path, cluster):
    from cohort_helpers import KillsItsProcess

    import torch

    c, trace = cluster
    for p in trace.iterdir():
        p.unlink()
    write_phantoms(tmp_path / "data", n=1)
    torch.save(KillsItsProcess().state_dict(), tmp_path / "dies.pt")
    data = cohort_data(tmp_path)
    data["models"] = [data["models"][0], {"name": "dies", "path": str(tmp_path / "dies.pt"),
                                          "class_path": "cohort_helpers:KillsItsProcess"}]
    data["methods"] = data["methods"][:1]
    data["cohort"] = {**data["cohort"], "executor": "dask", "scheduler": c.scheduler_address}
    result = run_cohort(parse_cohort_config(data))
    by_model = {r["model"]: r for r in result.records}
    assert result.status == "completed" and by_model["base"]["status"] == "ok"
    assert by_model["dies"]["status"] == "failed" and "died" in by_model["dies"]["error"]
    starts = [p.name.split(".")[0] for p in trace.iterdir()]
    assert starts.count(by_model["dies"]["key"]) == 2  # run once, retried once, then given up
    # (the base job may also run again: a result still held by a worker that dies before the driver
    # fetched it is recomputed by Dask)
    assert starts.count(by_model["base"]["key"]) >= 1


def test_resume_works_across_executors(tmp_path, cluster):
    write_phantoms(tmp_path / "data", n=2)
    data = cohort_data(tmp_path)
    data["models"], data["methods"] = data["models"][:1], data["methods"][:1]
    first = run_cohort(parse_cohort_config(data), executor="inline")
    lost = tmp_path / "out" / first.records[1]["file"]
    before = np.asarray(nib.load(str(lost)).dataobj)
    lost.unlink()
    data["cohort"] = {**data["cohort"], "scheduler": cluster[0].scheduler_address}
    again = run_cohort(parse_cohort_config(data), executor="dask", resume=True)
    assert again.skipped == 1 and again.status == "completed" and not again.failed
    redone = [r for r in again.records if r["key"] == first.records[1]["key"]]
    assert len(redone) == 1 and redone[0]["worker"] != first.records[1]["worker"]
    np.testing.assert_array_equal(np.asarray(nib.load(str(lost)).dataobj), before)
