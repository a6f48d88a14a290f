"""``esegeta run COHORT.yaml``: the command-line side of a cohort run (thin)."""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path
from typing import Any

from esegeta_engine.cohort.config import parse_cohort_config


def cmd_cohort(args: argparse.Namespace, data: dict[str, Any]) -> int:
    """Plan (and, unless ``--dry-run``, run) the cohort in ``data``; print the plan and a summary."""
    from esegeta_engine.cohort.plan import plan_cohort
    from esegeta_engine.cohort.run import run_cohort
    from esegeta_engine.interrupts import cancel_on_signals

    cfg = parse_cohort_config(data, base=Path(args.config).parent.resolve(), source=Path(args.config).name)
    if args.out:
        cfg.output.dir = Path(args.out).resolve()
    if args.overwrite:
        cfg.output.overwrite = True
    if getattr(args, "scheduler", None):
        cfg.cohort.scheduler = args.scheduler
    if getattr(args, "workers", None):
        cfg.jobs.workers = args.workers
    if args.device:
        for m in cfg.models:
            m.device = args.device

    def show(rec: dict[str, Any], done: int, total: int) -> None:
        if not args.quiet:
            print(f"[{done}/{total}] {rec['model']} · {rec['subject']} · {rec['method']} · class {rec['class']}: "
                  f"{rec['status']} ({rec['seconds']:.2f} s)", file=sys.stderr)

    from esegeta_engine.models import Trust

    plan = plan_cohort(cfg, Trust(pickled=bool(getattr(args, "trust_pickled", False)),
                                  bundle=bool(getattr(args, "trust_bundle", False))))
    print(plan.describe(), flush=True)  # before any work starts
    cancel = threading.Event()
    # SIGINT/SIGTERM (a batch scheduler's stop) cancel as in single runs: no job starts after it, the
    # inline job in flight stops at its next model evaluation, the manifest says "cancelled"
    with cancel_on_signals(cancel):
        try:
            result = run_cohort(cfg, executor=args.executor, dry_run=args.dry_run, resume=args.resume,
                                on_job=show, plan=plan, cancel=cancel)
        except KeyboardInterrupt:  # a second signal: run_cohort recorded the cancel
            print(f"\ncancelled; finished maps and the manifest are in {cfg.output.dir}", file=sys.stderr)
            return 130
    if result.status == "cancelled":
        print(f"cancelled; finished maps and the manifest are in {cfg.output.dir}", file=sys.stderr)
        return 130
    if args.dry_run:
        print("dry run: nothing written")
        return 0
    ok = sum(r.ok for r in result.maps)
    print(f"{ok} of {len(result.records)} jobs ok ({result.skipped} kept from before); results in "
          f"{result.out_dir} (run {result.status})")
    return 0 if not result.failed else 1
