"""Cohort throughput: ``local`` (2 CPU worker processes, 1 thread each) vs ``inline``, and shipping overhead.

On a cohort of ``--volumes`` phantoms (default 8, ``--size``³ voxels) with the
bundled U-Net and one method (Integrated Gradients, ``--steps`` steps, class 1):

* inline: every job in this process, torch limited to 1 thread (like one worker);
* local: a LocalCluster with 2 worker processes; the cluster start and the first
  (cold) pass, which loads the model once per worker, are reported apart from a
  warm pass (models cached in the workers);
* shipping overhead per job: a no-op job that carries the same job description
  to a worker and an array of the map's size back, timed round trip, as a share
  of the mean inline job time (target <= 5 %).

Maps are not written (the driver writes the same files whichever executor ran
the job). The machine's cores bound the ratio: 2 workers on 2 idle cores
approach 2x.

    .venv/bin/python benchmarks/bench_cohort.py [--volumes 8] [--size 32] [--steps 16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "engine"))


def _noop(spec, nbytes: int) -> np.ndarray:  # noqa: ANN001 - runs on the worker
    return np.zeros(nbytes // 4, dtype=np.float32)


def main() -> None:
    from cohort_helpers import cohort_data, write_phantoms

    from esegeta_engine.cohort import parse_cohort_config, plan_cohort
    from esegeta_engine.jobs.executors import InlineExecutor, start_local
    from esegeta_engine.cohort.run import job_specs

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--volumes", type=int, default=8)
    ap.add_argument("--size", type=int, default=32, help="phantom edge (divisible by 4)")
    ap.add_argument("--steps", type=int, default=16, help="integrated gradients steps")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_cohort_"))
    write_phantoms(tmp / "data", n=args.volumes, shape=(args.size,) * 3)
    data = cohort_data(tmp)
    data["models"] = data["models"][:1]
    data["methods"] = [{"name": "integrated_gradients", "params": {"n_steps": args.steps}}]
    cfg = parse_cohort_config(data)
    plan = plan_cohort(cfg)
    specs = job_specs(cfg, plan, plan.jobs)
    print(f"{len(specs)} jobs: {args.volumes} phantoms {args.size}^3, integrated_gradients n_steps={args.steps}")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    inline = InlineExecutor()
    list(inline.map(specs[:1]))  # model load + warm-up, as a warm worker would have
    t = time.perf_counter()
    outs = list(inline.map(specs))
    t_inline = time.perf_counter() - t
    torch.set_num_threads(threads)
    job_s = statistics.mean(t_inline / len(specs) for _ in [0])
    assert all(o.status == "ok" for o in outs)
    nbytes = outs[0].array.nbytes

    t = time.perf_counter()
    local = start_local(2)
    t_start = time.perf_counter() - t
    try:
        t = time.perf_counter()
        cold = list(local.map(specs))
        t_cold = time.perf_counter() - t
        t = time.perf_counter()
        warm = list(local.map(specs))
        t_warm = time.perf_counter() - t
        assert all(o.status == "ok" for o in cold + warm)
        for a, b in zip(sorted(outs, key=lambda o: o.key), sorted(warm, key=lambda o: o.key)):
            assert np.array_equal(a.array, b.array)
        client = local.client
        rounds = []
        for _ in range(3):
            futs = client.map(_noop, specs, nbytes=nbytes, pure=False)
            t = time.perf_counter()
            client.gather(futs)
            rounds.append((time.perf_counter() - t) / len(specs))
        # submit+gather of the whole batch, per job, with 2 workers in parallel: x2 gives the per-job cost
        ship = statistics.median(rounds) * 2
    finally:
        local.close()
    print(f"inline (1 thread):         {t_inline:7.2f} s  {len(specs) / t_inline:6.2f} jobs/s  "
          f"({job_s * 1000:.0f} ms per job)")
    print(f"local 2 workers, start:    {t_start:7.2f} s")
    print(f"local 2 workers, cold:     {t_cold:7.2f} s  {len(specs) / t_cold:6.2f} jobs/s (loads the model per worker)")
    print(f"local 2 workers, warm:     {t_warm:7.2f} s  {len(specs) / t_warm:6.2f} jobs/s  "
          f"ratio vs inline {t_inline / t_warm:.2f}x")
    inside = statistics.mean(o.seconds for o in outs), statistics.mean(o.seconds for o in warm)
    print(f"attribution time inside a job: inline {inside[0] * 1000:.0f} ms, local workers {inside[1] * 1000:.0f} ms "
          "(a gap here is CPU contention, not shipping)")
    print(f"shipping per job (spec in, {nbytes / 1e3:.0f} kB map out): {ship * 1000:.1f} ms "
          f"= {100 * ship / job_s:.1f} % of a job (target <= 5 %)")


if __name__ == "__main__":
    main()
