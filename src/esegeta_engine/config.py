"""The run configuration: one validated model, loaded in one place.

Configs are JSON or YAML. Unknown keys and bad values are rejected with a
message that names the key and the allowed values; method names and method
parameters are checked against the method registry, so the schema grows with
it. Relative paths are resolved against the config file's folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from esegeta_engine.config_checks import (AxiomConfig, ClassContrastConfig, FaithfulnessConfig, InfidelityConfig,
                                          LocalisationConfig, RandomisationConfig, SensitivityConfig)
from esegeta_engine.config_errors import format_validation_error
from esegeta_engine.config_scores import (EnergyPointingConfig, MprtConfig, RegionPerturbationConfig, RoadConfig,
                                          StabilityConfig)
from esegeta_engine.errors import ConfigError, EsegetaError
from esegeta_engine.methods import get_method
from esegeta_engine.preprocess import AxisOrder
from esegeta_engine.yamlsafe import read_config_file


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False, validate_assignment=True)


class ModelConfig(_Strict):
    """Where the model comes from and how to call it."""

    path: Path | None = Field(None, description="TorchScript file or state dict (.pt/.pth)")
    nnunet: Path | None = Field(None, description="nnU-Net v2 results folder (holds plans.json, dataset.json, "
                                "fold_N/): explained as nnUNetv2_predict runs it")
    configuration: str = Field("3d_fullres", description="nnunet: configuration in plans.json")
    folds: list[int | Literal["all"]] | Literal["all"] | None = Field(
        None, description="nnunet: folds to ensemble ('all': the fold trained on all cases); default every "
        "fold_N folder holding the checkpoint")
    checkpoint: str = Field("checkpoint_final.pth", description="nnunet: checkpoint file name in each fold")
    mirroring: bool = Field(True, description="nnunet: test-time mirroring over the checkpoint's axes "
                            "(false: faster, and a different function from the deployed one)")
    bundle: Path | None = Field(None, description="MONAI bundle folder (configs/, models/model.pt)")
    config: str = Field("configs/inference.json", description="bundle: inference config inside the bundle")
    format: Literal["auto", "torchscript", "state_dict", "pickled_module"] = "auto"
    class_path: str | None = Field(None, description="package.module:Class for a state dict")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="constructor kwargs of class_path")
    output: int | str | None = Field(None, description="output index/key for tuple/list/dict outputs")
    device: str = Field("cpu", description="cpu, cuda or cuda:N")

    @model_validator(mode="before")
    @classmethod
    def _no_trust_in_files(cls, data: Any) -> Any:
        # Trusting pickled code is the decision of whoever runs the command, never a property of
        # a file they may have received: the key is refused with a pointer to the flag.
        if isinstance(data, dict) and "trust_pickled" in data:
            raise ValueError("trust_pickled cannot be set in a config (a config from someone else could "
                             "then run code on your machine); remove it and pass --trust-pickled on the "
                             "command line if you trust the model file")
        if isinstance(data, dict) and "trust_bundle" in data:
            raise ValueError("trust_bundle cannot be set in a config (a bundle config can run Python); remove "
                             "it and pass --trust-bundle on the command line if you trust the bundle")
        return data

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        given = [k for k in ("path", "nnunet", "bundle") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of model.path (a model file), model.nnunet (an nnU-Net results "
                             "folder) or model.bundle (a MONAI bundle folder)"
                             + (f"; got {', '.join(given)}" if given else ""))
        return self


class PreprocessConfig(_Strict):
    """How a NIfTI array becomes a model input."""

    spatial_dims: Literal[2, 3] = 3
    in_channels: int = Field(1, ge=1, le=64)
    normalisation: Literal["none", "zscore", "minmax", "percentile"] = "none"
    percentiles: tuple[float, float] = (1.0, 99.0)
    axis_order: str = Field("xyz", description="model spatial axes in NIfTI terms, e.g. xyz or zyx")
    orientation: str | None = Field(
        None, description="reorient volumes to these axis codes first (e.g. RAS, LPS: the orientation the "
        "model was trained in; flips included); maps are brought back to the scan's voxel grid")

    @field_validator("orientation")
    @classmethod
    def _orientation(cls, v: str | None) -> str | None:
        if v is None:
            return v
        v = v.upper()
        pairs = ("LR", "PA", "IS")
        if len(v) not in (2, 3) or len({next((i for i, p in enumerate(pairs) if c in p), -1) for c in v}) != len(v) \
                or any(not any(c in p for p in pairs) for c in v):
            raise ValueError(f"orientation {v!r} is not a set of axis codes such as RAS, LPS or LPI "
                             "(one of L/R, one of P/A, one of I/S)")
        return v

    @model_validator(mode="before")
    @classmethod
    def _default_axis_order(cls, data: Any) -> Any:
        # the default is NIfTI order for the configured dimensionality: xyz, or xy for 2D
        if isinstance(data, dict) and data.get("axis_order") is None:
            data = {**data, "axis_order": "xyz"[: int(data.get("spatial_dims", 3) or 3)]}
        return data

    @field_validator("axis_order")
    @classmethod
    def _axis_order(cls, v: str) -> str:
        try:
            AxisOrder(v)
        except EsegetaError as exc:
            raise ValueError(exc.problem + "; " + (exc.fix or "")) from None
        return v

    @field_validator("percentiles")
    @classmethod
    def _percentiles(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= v[0] < v[1] <= 100:
            raise ValueError("need 0 <= low < high <= 100")
        return v

    @model_validator(mode="after")
    def _dims_match(self) -> PreprocessConfig:
        if len(self.axis_order) != self.spatial_dims:
            raise ValueError(
                f"preprocess.axis_order {self.axis_order!r} has {len(self.axis_order)} axes but "
                f"preprocess.spatial_dims is {self.spatial_dims}"
            )
        return self


class TargetConfig(_Strict):
    """Which scalar scores the methods explain."""

    kind: Literal["argmax", "otsu", "roi", "voxel", "classification", "channel", "outcome"] = "argmax"
    classes: list[int] | None = Field(None, description="score indices to explain; default per kind")
    activation: Literal["none", "softmax", "sigmoid"] | None = Field(
        None, description="applied to the output first; default sigmoid for otsu, none otherwise")
    frozen: bool = Field(True, description="freeze regions from the unperturbed prediction")
    channel: int = Field(0, ge=0, description="otsu: output channel of the foreground map; channel: the "
                         "layer's channel (filter) whose mean activation is explained")
    layer: str | None = Field(None, description="channel: module name (`esegeta layers MODEL`)")
    unit: list[int] | None = Field(None, description="channel: one unit (neuron) on the layer's grid, "
                                   "(x, y[, z]) in NIfTI axis order, instead of the channel mean")
    roi_mask: Path | None = Field(None, description="roi: NIfTI mask on the volume's grid")
    voxel: list[int] | None = Field(None, description="voxel: index (x, y[, z]) in the NIfTI volume")
    ground_truth: Path | None = Field(None, description="outcome: NIfTI label image on the volume's grid")
    outcome: Literal["tp", "fp", "fn"] = Field(
        "fn", description="outcome: true positives, false positives or false negatives (missed voxels)")
    components: bool = Field(False, description="argmax, otsu, outcome: one map per connected structure "
                             "(26-connectivity in 3D, 8 in 2D), largest first")
    min_voxels: int = Field(1, ge=1, description="components: ignore structures smaller than this")
    max_components: int | None = Field(20, ge=1, description="components: at most this many per class")

    @model_validator(mode="after")
    def _needs(self) -> TargetConfig:
        if self.components and self.kind not in ("argmax", "otsu", "outcome"):
            raise ValueError(f"target.components splits argmax, otsu or outcome regions, not {self.kind!r}")
        if self.kind == "voxel" and not self.voxel:
            raise ValueError("target kind 'voxel' needs target.voxel: [x, y, z]")
        if self.kind == "channel" and not self.layer:
            raise ValueError("target kind 'channel' needs target.layer: <module name> (and target.channel: k); "
                             "`esegeta layers MODEL` lists the module names")
        return self

    @property
    def resolved_activation(self) -> str:
        """The activation actually used."""
        return self.activation or ("sigmoid" if self.kind == "otsu" else "none")


class ExecutionConfig(_Strict):
    """How the network is run: whole volume or sliding window, padding, precision."""

    mode: Literal["auto", "whole", "sliding_window"] = Field(
        "auto", description="auto: sliding window when patch_size is set and the volume is larger")
    patch_size: list[int] | int | None = Field(None, description="patch size (network training size), "
                                               "one per spatial axis or one for all")
    overlap: float = Field(0.25, ge=0.0, lt=1.0, description="fraction of a patch shared with a neighbour")
    blend: Literal["gaussian", "constant"] = "gaussian"
    sw_batch_size: int = Field(1, ge=1, le=4096, description="patches per model evaluation")
    padding: Literal["constant", "reflect", "replicate"] = Field(
        "constant", description="how volumes are padded to sizes the network takes")
    divisible_by: int | Literal["auto"] = Field(
        "auto", description="pad whole-volume inputs to multiples of this (U-Nets: 2**depth); auto: "
        "found on the first forward pass that the model rejects")
    precision: Literal["fp32", "fp16", "bf16"] = Field(
        "fp32", description="autocast precision of the network (maps that turn non-finite are redone in fp32)")
    checkpointing: Literal["auto", "on", "off"] = Field(
        "auto", description="activation checkpointing for plain-gradient methods: network blocks keep only their "
        "inputs and are recomputed in the backward (less memory, ~one more forward); auto: on for nnU-Net folders")
    executor: str = Field("inline", description="who runs the jobs: inline (this process), pool (a thread "
                          "and a model copy per device), local (Dask processes), dask (a scheduler), or "
                          "a registered one")
    devices: list[str] | None = Field(None, description="pool or local: one worker per device, e.g. "
                                      "[cuda:0, cuda:1]")
    workers: int = Field(2, ge=1, le=256, description="local: CPU worker processes (1 thread each)")
    scheduler: str | None = Field(None, description="dask: scheduler address, e.g. tcp://host:8786")
    connect_timeout_s: float = Field(5.0, gt=0, description="dask: give up reaching the scheduler after this")

    @field_validator("executor")
    @classmethod
    def _executor(cls, v: str) -> str:
        from esegeta_engine.jobs.registry import check_executor_name

        return check_executor_name(v)

    @field_validator("patch_size")
    @classmethod
    def _patch(cls, v: list[int] | int | None) -> list[int] | int | None:
        items = v if isinstance(v, list) else ([] if v is None else [v])
        if any(int(i) < 1 or int(i) > 4096 for i in items) or (isinstance(v, list) and len(v) not in (2, 3)):
            raise ValueError("give one size or one per spatial axis, each in [1, 4096]")
        return v

    @field_validator("divisible_by")
    @classmethod
    def _div(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= 1024:
            raise ValueError("must be 'auto' or an integer in [1, 1024]")
        return v

    def patch_tuple(self, spatial_dims: int) -> tuple[int, ...] | None:
        """The patch size as one int per spatial axis (None when unset)."""
        if self.patch_size is None:
            return None
        if isinstance(self.patch_size, int):
            return (self.patch_size,) * spatial_dims
        if len(self.patch_size) != spatial_dims:
            raise ConfigError(f"execution.patch_size {self.patch_size} has {len(self.patch_size)} sizes for "
                              f"{spatial_dims}D volumes", f"give {spatial_dims} sizes or one for every axis")
        return tuple(self.patch_size)


class NoiseTunnelConfig(_Strict):
    """SmoothGrad-style averaging over noisy copies of the input."""

    type: Literal["smoothgrad", "smoothgrad_sq", "vargrad"] = "smoothgrad"
    samples: int = Field(8, ge=1, le=1000)
    stdev: float = Field(0.1, ge=0.0, description="noise std, in normalised intensity units")
    batch_size: int | None = Field(None, ge=1)


class MethodConfig(_Strict):
    """One method with its parameters (checked against the registry)."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    layers: list[str] = Field(default_factory=list, description="module names for layer methods")
    noise_tunnel: NoiseTunnelConfig | None = None

    @model_validator(mode="after")
    def _against_registry(self) -> MethodConfig:
        try:
            spec = get_method(self.name)
            spec.resolve_params(self.params)
        except EsegetaError as exc:
            raise ValueError(exc.problem + ("; " + exc.fix if exc.fix else "")) from None
        if spec.needs_layer and not self.layers:
            raise ValueError(f"method '{self.name}' needs layers: [module name, ...]; "
                             "`esegeta layers MODEL` lists them")
        if not spec.needs_layer and self.layers:
            raise ValueError(f"method '{self.name}' does not take layers")
        if self.noise_tunnel is not None and not spec.noise_tunnel:
            raise ValueError(f"method '{self.name}' cannot be wrapped in a noise tunnel")
        return self


class EvaluationConfig(_Strict):
    """Which trust metrics to compute for every map (axiom checks on, the rest off by default)."""

    axioms: AxiomConfig | None = Field(default_factory=AxiomConfig,
                                       description="completeness checks; null switches them off")
    infidelity: InfidelityConfig | None = None
    sensitivity: SensitivityConfig | None = None
    faithfulness: FaithfulnessConfig | None = None
    localisation: LocalisationConfig | None = None
    randomisation: RandomisationConfig | None = None
    class_contrast: ClassContrastConfig | None = None
    road: RoadConfig | None = None
    region_perturbation: RegionPerturbationConfig | None = None
    mprt: MprtConfig | None = None
    energy_pointing: EnergyPointingConfig | None = None
    stability: StabilityConfig | None = None
    report: bool = Field(False, description="write report.html (figures, tables) at the end of the run")


class OutputConfig(_Strict):
    """Where results go."""

    dir: Path = Path("esegeta_out")
    overwrite: bool = Field(False, description="allow writing into a folder that holds a previous run")
    save_prediction: bool = Field(True, description="also write the model's prediction as NIfTI")
    probabilities: bool = Field(False, description="also write <volume>__probabilities.nii.gz: per-class "
                                "probabilities (4D float32, classes on the 4th axis) on the scan's grid")


class RunOptions(_Strict):
    """Run-wide options."""

    seed: int = Field(0, ge=0, le=2**63 - 1, description="0 to 2**63 - 1")
    timeout_s: float | None = Field(900.0, gt=0, description="per method and target; null: none")


class RunSections(_Strict):
    """The sections a single run and a cohort run share (one list, so neither misses one)."""

    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    target: TargetConfig = Field(default_factory=TargetConfig)
    methods: list[MethodConfig] = Field(min_length=1)
    output: OutputConfig = Field(default_factory=OutputConfig)
    run: RunOptions = Field(default_factory=RunOptions)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)


class Config(RunSections):
    """A whole run."""

    model: ModelConfig
    volumes: list[Path] = Field(min_length=1)

    @field_validator("volumes", mode="before")
    @classmethod
    def _one_volume(cls, v: Any) -> Any:
        return [v] if isinstance(v, (str, Path)) else v  # `volumes: scan.nii.gz` means that one volume

    @model_validator(mode="after")
    def _roi_mask_file(self) -> Config:
        # an ROI given in memory (napari Labels layer) needs no file; a config run does
        if self.target.kind == "roi" and self.target.roi_mask is None:
            raise ValueError("target kind 'roi' needs target.roi_mask (a NIfTI mask on the volume's grid)")
        if self.target.kind == "outcome" and self.target.ground_truth is None:
            raise ValueError("target kind 'outcome' needs target.ground_truth (a NIfTI label image on the "
                             "volume's grid)")
        return self

    @model_validator(mode="after")
    def _randomisation_methods(self) -> Config:
        r = self.evaluation.randomisation
        names = [m.name for m in self.methods]
        if r is not None and r.methods:
            unknown = [n for n in r.methods if n not in names]
            if unknown:
                raise ValueError(f"evaluation.randomisation.methods {unknown} are not among this run's "
                                 f"methods {names}")
        return self

    def resolve_paths(self, base: Path) -> Config:
        """Return a copy with relative paths made absolute against ``base``."""
        def fix(p: Path | None) -> Path | None:
            return None if p is None else (p if p.is_absolute() else (base / p))
        data = self.model_copy(deep=True)
        data.model.path = fix(data.model.path)
        data.model.nnunet = fix(data.model.nnunet)
        data.model.bundle = fix(data.model.bundle)
        data.volumes = [fix(v) for v in data.volumes]
        data.target.roi_mask = fix(data.target.roi_mask)
        data.target.ground_truth = fix(data.target.ground_truth)
        data.output.dir = fix(data.output.dir)
        if data.evaluation.localisation is not None:
            data.evaluation.localisation.mask = fix(data.evaluation.localisation.mask)
        if data.evaluation.stability is not None:
            data.evaluation.stability.models = [fix(p) for p in data.evaluation.stability.models]
        return data


def parse_config(data: dict[str, Any], base: Path | None = None, source: str = "config") -> Config:
    """Validate a config mapping (paths resolved against ``base``)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a mapping of keys to values, got {type(data).__name__}",
                          "see README.md for an example config")
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        raise format_validation_error(exc, source, Config) from None
    return cfg.resolve_paths(base) if base is not None else cfg


def load_config(path: str | Path) -> Config:
    """Read and validate a JSON or YAML config file.

    Raises
    ------
    ConfigError
        Missing file, bad syntax, unknown keys or bad values.
    """
    path = Path(path)
    data = read_config_file(path)  # bounded: size, depth, alias expansion
    return parse_config(data, base=path.parent.resolve(), source=path.name)
