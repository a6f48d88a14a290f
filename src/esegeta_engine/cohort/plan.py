"""Plan a cohort: resolve the volumes, hash the inputs, list every job with a stable key.

Planning reads only file headers and hashes files; no model runs. Every
problem that can be known before work starts (a glob matching nothing, a CSV
row naming a missing file, volumes of different grids asked to aggregate,
duplicate subjects) is raised here as one :class:`EsegetaError`.
"""

from __future__ import annotations

import csv
import glob as globlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from esegeta_engine.cohort.config import CohortConfig
from esegeta_engine.cohort.subjects import derive_subject_ids, describe_subjects
from esegeta_engine.config import MethodConfig, PreprocessConfig, TargetConfig
from esegeta_engine.errors import ConfigError, VolumeError
from esegeta_engine.io import Volume, is_nifti, load_volume
from esegeta_engine.io import file_sha256 as io_file_sha256
from esegeta_engine.methods import get_method
from esegeta_engine.jobs.plan import array_fingerprint, key_context, model_fingerprint, plan_jobs
from esegeta_engine.jobs.plan import job_key as plan_key
from esegeta_engine.methods.registry import CostInfo
from esegeta_engine.jobs.naming import slug as _slug
from esegeta_engine.preprocess import AxisOrder

_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """:func:`esegeta_engine.io.file_sha256` of an input, memoised per path, size and modification time."""
    p = Path(path)
    st = p.stat()
    memo = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _HASHES:
        _HASHES[memo] = io_file_sha256(p)
    return _HASHES[memo]


def method_label(method: MethodConfig, layer: str | None = None) -> str:
    """``name[@layer][+noise]`` as it appears in file names and tables (all layers when none is given)."""
    layers = [layer] if layer else method.layers
    text = method.name + (f"@{';'.join(layers)}" if layers else "")
    return text + (f"+{method.noise_tunnel.type}" if method.noise_tunnel else "")


def job_key(model_key: str, volume_key: str, method: MethodConfig, cls: int, target: TargetConfig,
            preprocess: PreprocessConfig, seed: int, *, model_output: int | str | None = None,
            extra: dict[str, Any] | None = None, execution: dict[str, Any] | None = None,
            layer: str | None = None) -> str:
    """The key of one cohort job: :func:`esegeta_engine.jobs.plan.job_key`, the one key of single
    runs and cohorts, for one volume.

    It covers what determines the numbers: the model's weights, the volume's content, the
    method with its fully resolved parameters, layer and noise tunnel, the class, the target,
    preprocessing and execution settings, the model output selection and the seed. It does not
    cover where or how the job runs (executor, device name, worker), so a result made by one
    executor is reused by another.

    Parameters
    ----------
    model_key, volume_key : str
        :func:`~esegeta_engine.jobs.plan.model_fingerprint` of the model and
        :func:`~esegeta_engine.jobs.plan.array_fingerprint` of the volume.
    method : MethodConfig
        The method (parameters are resolved against the registry, so an explicit
        default and an omitted one give the same key).
    cls : int
        The explained class (score index).
    target, preprocess : TargetConfig, PreprocessConfig
        Settings of the run (``target.classes`` is ignored: ``cls`` says it).
    seed : int
        The run's seed.
    model_output : int, str or None
        Output selection of multi-output models.
    extra : dict, optional
        ``{"roi": fingerprint}`` of an ROI target's mask.
    execution : dict, optional
        The execution section as JSON.
    layer : str, optional
        The layer of a layer method (default: its first).

    Returns
    -------
    str
        64 hex digits.
    """
    spec = get_method(method.name)
    nt = method.noise_tunnel.model_dump() if method.noise_tunnel else None
    context = key_context(target.model_dump(mode="json"), preprocess.model_dump(mode="json"), execution,
                          model_output, seed, model_key, [volume_key], (extra or {}).get("roi"))
    layer = layer if layer is not None else (method.layers[0] if method.layers else None)
    return plan_key(spec.name, spec.resolve_params(method.params), layer, nt, int(cls), context)


@dataclass
class CohortVolume:
    """One volume of the cohort, with what the CSV said about it."""

    path: Path
    subject: str
    group: str | None = None
    ground_truth: Path | None = None
    roi: Path | None = None
    sha256: str = ""
    content: str = ""
    shape: tuple[int, ...] = ()
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    subject_from: str = "from the file names"  # how ``subject`` was found (see cohort.subjects)


@dataclass(frozen=True)
class CohortJob:
    """One (model, volume, method, layer, class) job; ``file`` is relative to the output folder.

    ``method`` is the label (``name[@layer][+noise]``) used in file names and tables.
    """

    key: str
    model: str
    volume: int
    subject: str
    method_index: int
    method: str
    cls: int
    file: str
    cost: int | None
    layer: str | None = None
    score_cost: int | None = 0  # model evaluations of the map's scores (ROAD, MPRT, stability, ...)


@dataclass
class CohortPlan:
    """Every job of a cohort, known before any model runs."""

    volumes: list[CohortVolume]
    model_sha: dict[str, str]
    jobs: list[CohortJob]
    common_grid: bool
    grid_note: str
    model_key: dict[str, str] = field(default_factory=dict)
    trust: dict[str, bool] = field(default_factory=dict)  # the command's --trust-* flags, for the workers

    @property
    def estimated_evaluations(self) -> int | None:
        """Model evaluations of the jobs whose method declares its cost, their scores' included
        (None when none does)."""
        known = [j.cost + (j.score_cost or 0) for j in self.jobs if j.cost is not None]
        return int(sum(known)) if known else None

    def describe(self) -> str:
        """One paragraph for the console: how many jobs and what they cost."""
        n_models = len(self.model_sha)
        methods = sorted({j.method for j in self.jobs})
        classes = sorted({j.cls for j in self.jobs})
        est = self.estimated_evaluations
        unknown = sum(j.cost is None for j in self.jobs)
        text = (f"cohort plan: {len(self.jobs)} jobs = {n_models} model(s) x {len(self.volumes)} volume(s) x "
                f"{len(methods)} method(s) x {len(classes)} class(es)")
        if est is not None:
            scores = sum(j.score_cost or 0 for j in self.jobs if j.cost is not None)
            text += f"; about {est} model evaluations" + (f" ({scores} of them for the scores)" if scores else "") \
                + (f" (+{unknown} jobs of undeclared cost)" if unknown else "")
        else:
            text += "; cost: these methods do not declare one"
        return text + f"\n{describe_subjects(self.volumes)}\n{self.grid_note}"


def _csv_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise ConfigError(f"cohort CSV {str(path)!r} does not exist", "check cohort.csv")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip() for f in (reader.fieldnames or [])]
        if "volume" not in fields:
            raise ConfigError(f"{path.name} has no 'volume' column (columns: {fields})",
                              "add a header row: volume,ground_truth,roi,subject,group (only volume is needed)")
        unknown = sorted(set(fields) - {"volume", "ground_truth", "roi", "subject", "group"})
        if unknown:
            raise ConfigError(f"{path.name} has unknown columns {unknown}",
                              "allowed: volume, ground_truth, roi, subject, group")
        return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]


def _existing(path: Path, what: str, where: str) -> Path:
    if not path.is_file():
        raise VolumeError(f"{where}: {what} {str(path)!r} does not exist",
                          "fix the path (relative paths are read against the CSV's folder) or drop the row")
    if not is_nifti(path):
        raise VolumeError(f"{where}: {what} {path.name} is not a NIfTI file", "give .nii or .nii.gz files")
    return path


def resolve_volumes(cfg: CohortConfig) -> list[CohortVolume]:
    """The cohort's volumes from the list, the glob or the CSV; every file checked to exist.

    Raises
    ------
    ConfigError, VolumeError
        A glob matching nothing, a CSV row naming a missing file, duplicate subjects.
    """
    c = cfg.cohort
    vols: list[CohortVolume] = []
    if c.glob:
        paths = sorted(Path(p) for p in globlib.glob(c.glob, recursive=True) if is_nifti(p))
        if not paths:
            raise ConfigError(f"cohort.glob {c.glob!r} matches no NIfTI file",
                              "check the pattern (relative to the config's folder); e.g. 'data/*.nii.gz'")
        ids, rule = derive_subject_ids(paths)
        vols = [CohortVolume(p, s, subject_from=rule) for p, s in zip(paths, ids)]
    elif c.csv is not None:
        base = c.csv.parent
        for i, row in enumerate(_csv_rows(c.csv), start=2):
            where = f"{c.csv.name} line {i}"
            if not row.get("volume"):
                raise ConfigError(f"{where} has an empty 'volume'", "give a NIfTI path in every row")
            p = _existing(_abs(row["volume"], base), "volume", where)
            opt = {k: _existing(_abs(row[k], base), k.replace("_", " "), where)
                   for k in ("ground_truth", "roi") if row.get(k)}
            given = _slug(row.get("subject") or "")
            vols.append(CohortVolume(p, given, row.get("group") or None, opt.get("ground_truth"), opt.get("roi"),
                                     subject_from="from the CSV's subject column" if given else ""))
        if not vols:
            raise ConfigError(f"{c.csv.name} has no rows", "list one volume per row under the header")
        ids, rule = derive_subject_ids([v.path for v in vols])
        for v, s in zip(vols, ids):
            if not v.subject:
                v.subject, v.subject_from = s, rule
    else:
        paths = [_existing(p, "volume", "cohort.volumes") for p in c.volumes]
        ids, rule = derive_subject_ids(paths)
        vols = [CohortVolume(p, s, subject_from=rule) for p, s in zip(paths, ids)]
    subjects = [v.subject for v in vols]
    dupes = sorted({s for s in subjects if subjects.count(s) > 1})
    if dupes:
        raise ConfigError(f"subjects {dupes} appear more than once in the cohort",
                          "give each row a unique 'subject' (CSV) or use distinct file names")
    return vols


def _abs(text: str, base: Path) -> Path:
    p = Path(text)
    return p if p.is_absolute() else base / p


def _read_geometry(v: CohortVolume) -> None:
    import nibabel as nib

    try:
        img = nib.load(str(v.path))
    except Exception as exc:
        raise VolumeError(f"{v.path.name} cannot be read as NIfTI ({exc})", "export it again") from None
    shape = list(img.shape)
    while len(shape) > 2 and shape[-1] == 1:
        shape.pop()
    v.shape, v.affine = tuple(shape), np.asarray(img.affine, dtype=float)


def check_grid(volumes: list[CohortVolume], tolerance: float) -> tuple[bool, str]:
    """Whether all volumes share one grid (shape, and affine within ``tolerance``), and why not."""
    ref = volumes[0]
    for v in volumes[1:]:
        if v.shape != ref.shape:
            return False, (f"volumes are on different grids ({ref.subject}: shape {ref.shape}, "
                           f"{v.subject}: shape {v.shape}): per-volume maps only, no aggregate maps")
        if not np.allclose(v.affine, ref.affine, atol=tolerance, rtol=0):
            return False, (f"volumes are on different grids ({ref.subject} and {v.subject} have different "
                           "affines): per-volume maps only, no aggregate maps")
    return True, f"all {len(volumes)} volumes share one grid {ref.shape}: aggregate maps will be written"


def plan_cohort(cfg: CohortConfig, trust: Any = None) -> CohortPlan:
    """Resolve, check and hash every input, and list every job with its key.

    ``trust`` (a :class:`~esegeta_engine.models.Trust`: the command's ``--trust-pickled`` /
    ``--trust-bundle``) travels with the plan to every worker; models may be files, nnU-Net
    folders (``nnunet: DIR``) or MONAI bundles (``bundle: DIR``).

    Raises
    ------
    EsegetaError
        Any problem found before work starts (see the module docstring).
    """
    from esegeta_engine.evaluation.costs import jobs_score_cost

    for m in cfg.methods:
        if get_method(m.name).needs_batch:
            raise ConfigError(f"method {m.name!r} explains a batch of volumes together, which a cohort job "
                              "(one volume) cannot do", "run it as an ordinary run over the volumes")
    model_sha, model_key = {}, {}
    trusted = {"trust_pickled": bool(getattr(trust, "pickled", False)),
               "trust_bundle": bool(getattr(trust, "bundle", False))}
    decided = {}  # each model's own preprocess/execution (a deployed pipeline decides them, as in single runs)
    for m in cfg.models:
        model_sha[m.name] = _model_sha(m)
        model_key[m.name] = _model_key(m, model_sha[m.name], trusted)
        own = _loaded(m, model_sha[m.name], trusted).configure(cfg)
        decided[m.name] = (own.preprocess, own.execution.model_dump(mode="json"))
    volumes = resolve_volumes(cfg)
    p = cfg.preprocess
    for v in volumes:
        _read_geometry(v)
        v.sha256 = file_sha256(v.path)
        v.content = array_fingerprint(load_volume(v.path, spatial_dims=p.spatial_dims, channels=p.in_channels).data)
    common, note = check_grid(volumes, cfg.cohort.grid_tolerance)
    if cfg.cohort.aggregate == "off":
        common, note = False, "aggregation switched off (cohort.aggregate: off): per-volume maps only"
    elif not common and cfg.cohort.aggregate == "require":
        raise VolumeError(note.split(":")[0] + " but cohort.aggregate is 'require'",
                          "resample the volumes onto one template grid first, or set cohort.aggregate: auto")
    jobs = []
    for m in cfg.models:
        p, execution = decided[m.name]
        order = AxisOrder(p.axis_order)
        for vi, v in enumerate(volumes):
            spatial = tuple(v.shape[i] for i in order.permutation) if len(v.shape) >= p.spatial_dims \
                else tuple(v.shape)
            extra = None
            if cfg.target.kind == "roi":
                roi = v.roi or cfg.target.roi_mask
                if roi is None or not Path(roi).is_file():
                    raise ConfigError(f"target kind 'roi' but subject {v.subject} has no ROI mask file"
                                      + (f" ({roi})" if roi else ""),
                                      "give every CSV row a 'roi' column value, or target.roi_mask for all")
                mask = load_volume(Path(roi), spatial_dims=p.spatial_dims).data != 0
                extra = {"roi": array_fingerprint(mask)}
            context = key_context(cfg.target.model_dump(mode="json"), p.model_dump(mode="json"), execution,
                                  m.output, cfg.run.seed, model_key[m.name], [v.content], (extra or {}).get("roi"))
            info = CostInfo(1, p.in_channels, spatial)
            for mi, meth in enumerate(cfg.methods):  # the one planner of single runs, method by method
                for job in plan_jobs([meth], cfg.target.classes or [], str, cfg.target.kind, (vi,), info=info,
                                     context=context):
                    label = method_label(meth, job.layer)
                    name = f"maps/{m.name}/{v.subject}__{_slug(label)}__{cfg.target.kind}-{job.cls}.nii.gz"
                    jobs.append(CohortJob(job.key, m.name, vi, v.subject, mi, label, int(job.cls), name,
                                          job.expected_evaluations, job.layer,
                                          jobs_score_cost(cfg.evaluation, [job],
                                                          _loaded(m, model_sha[m.name], trusted).module)))
    return CohortPlan(volumes, model_sha, jobs, common, note, model_key, trusted)


def _model_sha(model: Any) -> str:
    """sha256 of a model file, or of the files that define a folder model (nnU-Net, bundle)."""
    from esegeta_engine.jobs.portable import source_sha256
    from esegeta_engine.models.sources import selected_source, source_path

    where = source_path(model)
    if where is None or not Path(where).exists() or (selected_source(model) == "file" and not Path(where).is_file()):
        key = "path" if selected_source(model) == "file" else selected_source(model)
        raise ConfigError(f"model {model.name!r}: {'file' if key == 'path' else 'folder'} {str(where)!r} does "
                          f"not exist", f"check models[].{key}")
    return source_sha256(model)


def _loaded(model: Any, sha: str, trusted: dict[str, bool] | None = None) -> Any:
    """The cohort model's loaded source (once per process, on the CPU)."""
    from esegeta_engine.jobs.worker import cached_source

    return cached_source({**model.model_dump(mode="json"), **(trusted or {})}, sha, "cpu")


def _model_key(model: Any, sha: str, trusted: dict[str, bool] | None = None) -> str:
    """The weights' fingerprint of a cohort model (loaded once per process, on the CPU)."""
    return model_fingerprint(_loaded(model, sha, trusted).module)


def grid_volume(plan: CohortPlan, index: int, cache: dict[int, Volume] | None = None) -> Volume:
    """A header-only :class:`Volume` of volume ``index`` for writing maps on its grid (no voxels read)."""
    cache = {} if cache is None else cache
    if index not in cache:
        import nibabel as nib

        v = plan.volumes[index]
        cache[index] = Volume(np.broadcast_to(np.float32(0), v.shape), v.affine, nib.load(str(v.path)).header,
                              v.path)
    return cache[index]
