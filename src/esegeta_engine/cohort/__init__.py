"""Cohort runs: many volumes x models x methods x classes, planned up front, run by an executor.

A cohort config is an ordinary run config whose ``model`` is replaced by a
list of named ``models`` and which has a ``cohort`` section (where the volumes
come from, which executor runs the jobs, whether to aggregate). Every job is
one (model, volume, method, class) and is executed as an ordinary
single-volume run inside the worker (:mod:`esegeta_engine.jobs.worker`);
the driver (:mod:`esegeta_engine.cohort.run`) writes each map as it arrives,
keeps the manifest valid after every job and computes the cohort results at
the end (:mod:`esegeta_engine.cohort.aggregate`).
"""

from esegeta_engine.cohort.config import CohortConfig, is_cohort_data, load_cohort_config, parse_cohort_config
from esegeta_engine.cohort.plan import CohortJob, CohortPlan, job_key, plan_cohort
from esegeta_engine.cohort.run import CohortResult, run_cohort

__all__ = ["CohortConfig", "CohortJob", "CohortPlan", "CohortResult", "is_cohort_data", "job_key",
           "load_cohort_config", "parse_cohort_config", "plan_cohort", "run_cohort"]
