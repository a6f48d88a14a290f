"""The cohort configuration: named models, a volume source, an executor.

Everything else (preprocess, target, methods, evaluation, output, run) is the
single-run schema of :mod:`esegeta_engine.config`, reused as is, so a cohort
job is an ordinary run of one model on one volume with one method and class.

Example (YAML)::

    models:
      - {name: baseline, path: unet_a.pt, class_path: "pkg.nets:UNet"}
      - {name: finetuned, path: unet_b.pt, class_path: "pkg.nets:UNet"}
    cohort:
      csv: subjects.csv          # or glob: "data/*.nii.gz", or volumes: [a.nii.gz, b.nii.gz]
      executor: local            # inline | local | dask
      workers: 2                 # local: CPU worker processes (or devices: [cuda:0, cuda:1])
    target: {kind: argmax, classes: [1]}
    methods: [{name: saliency}, {name: integrated_gradients, params: {n_steps: 16}}]
    output: {dir: cohort_out}
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from esegeta_engine.config import (
    ModelConfig,
    RunSections,
    _Strict,
    format_validation_error,
)
from esegeta_engine.errors import ConfigError
from esegeta_engine.jobs.registry import check_executor_name, executor_names
from esegeta_engine.yamlsafe import read_config_file

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
EXECUTORS = executor_names()  # the built-ins (a test or plugin may register more: see jobs.registry)


class CohortModel(ModelConfig):
    """A model of the cohort, with the name used in file names and tables."""

    name: str = Field(description="short name: letters, digits, '.', '_' or '-'")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"model name {v!r} must be letters, digits, '.', '_' or '-' (it names folders)")
        return v


class CohortSection(_Strict):
    """Where the volumes come from and how the jobs run."""

    volumes: list[Path] = Field(default_factory=list, description="NIfTI files")
    glob: str | None = Field(None, description="glob pattern of NIfTI files, relative to the config")
    csv: Path | None = Field(None, description="CSV with columns volume[, ground_truth, roi, subject, group]")
    executor: str = Field("inline", description="inline, pool, local, dask or a registered executor")
    workers: int = Field(2, ge=1, le=256, description="local: CPU worker processes (1 thread each)")
    devices: list[str] | None = Field(None, description="local or pool: one worker per device, e.g. [cuda:0, cuda:1]")
    scheduler: str | None = Field(None, description="dask: scheduler address, e.g. tcp://host:8786")
    connect_timeout_s: float = Field(5.0, gt=0, description="dask: give up reaching the scheduler after this")
    aggregate: Literal["auto", "require", "off"] = Field(
        "auto", description="auto: aggregate maps when all volumes share one grid; require: refuse otherwise")
    grid_tolerance: float = Field(1e-3, ge=0, description="affine entries equal within this (mm) = one grid")

    @field_validator("executor")
    @classmethod
    def _executor(cls, v: str) -> str:
        return check_executor_name(v)

    @model_validator(mode="after")
    def _one_source(self) -> CohortSection:
        given = [k for k in ("volumes", "glob", "csv") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("give the volumes exactly one way: cohort.volumes (a list), cohort.glob "
                             f"(a pattern) or cohort.csv (a table); got {given or 'none'}")
        if self.executor == "dask" and not self.scheduler:
            raise ValueError("executor 'dask' needs cohort.scheduler (e.g. tcp://host:8786)")
        if self.devices is not None and not self.devices:
            raise ValueError("cohort.devices is empty: give e.g. [cuda:0, cuda:1] or leave it out")
        return self


class CohortConfig(RunSections):
    """A whole cohort run."""

    models: list[CohortModel] = Field(min_length=1)
    cohort: CohortSection

    @model_validator(mode="after")
    def _checks(self) -> CohortConfig:
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"two models are named {', '.join(map(repr, dupes))}: names must be unique "
                             "(they name the output folders and table columns)")
        if not self.target.classes:
            raise ValueError("a cohort run needs target.classes (e.g. [1]) so every job is known before "
                             "any model runs")
        if self.evaluation.randomisation is not None:
            raise ValueError("evaluation.randomisation is not part of cohort runs; run it on one volume")
        if self.evaluation.localisation is not None:
            raise ValueError("evaluation.localisation takes one mask; in a cohort give each volume's "
                             "ground truth in the CSV column 'ground_truth'")
        if self.target.kind == "roi" and self.target.roi_mask is None and self.cohort.csv is None:
            raise ValueError("target kind 'roi' needs target.roi_mask or a CSV column 'roi'")
        if self.target.kind == "outcome" and self.target.ground_truth is None and self.cohort.csv is None:
            raise ValueError("target kind 'outcome' needs each volume's ground truth in the CSV column "
                             "'ground_truth' (or target.ground_truth)")
        if self.execution.executor != "inline":
            raise ValueError("execution.executor is for single runs: a cohort's executor is cohort.executor")
        if self.target.components:
            raise ValueError("target.components is not part of cohort runs (the number of structures is "
                             "known only after the prediction); explain the components of one volume")
        return self

    def resolve_paths(self, base: Path) -> CohortConfig:
        """Return a copy with relative paths made absolute against ``base``."""
        def fix(p: Path | None) -> Path | None:
            return None if p is None else (p if p.is_absolute() else base / p)
        data = self.model_copy(deep=True)
        for m in data.models:
            m.path, m.nnunet, m.bundle = fix(m.path), fix(m.nnunet), fix(m.bundle)
        data.cohort.volumes = [fix(v) for v in data.cohort.volumes]
        data.cohort.csv = fix(data.cohort.csv)
        if data.cohort.glob and not Path(data.cohort.glob).is_absolute():
            data.cohort.glob = str(base / data.cohort.glob)
        data.target.roi_mask = fix(data.target.roi_mask)
        data.target.ground_truth = fix(data.target.ground_truth)
        data.output.dir = fix(data.output.dir)
        return data


def is_cohort_data(data: Any) -> bool:
    """True for a config mapping that describes a cohort (has ``models`` or ``cohort``)."""
    return isinstance(data, dict) and ("models" in data or "cohort" in data)


def parse_cohort_config(data: dict[str, Any], base: Path | None = None, source: str = "config") -> CohortConfig:
    """Validate a cohort config mapping (paths resolved against ``base``).

    Raises
    ------
    ConfigError
        Naming every bad key (unknown keys, duplicate model names, missing classes...).
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a mapping of keys to values", "see the cohort example in README.md")
    try:
        cfg = CohortConfig.model_validate(data)
    except ValidationError as exc:
        raise format_validation_error(exc, source) from None
    return cfg.resolve_paths(base) if base is not None else cfg


def read_config_data(path: str | Path) -> dict[str, Any]:
    """Read a JSON or YAML config file into a mapping (no validation)."""
    return read_config_file(path)  # bounded: size, depth, alias expansion (the one config reader)


def load_cohort_config(path: str | Path) -> CohortConfig:
    """Read and validate a cohort config file (relative paths against its folder)."""
    path = Path(path)
    return parse_cohort_config(read_config_data(path), base=path.parent.resolve(), source=path.name)
