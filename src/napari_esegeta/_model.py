"""Model loading for the Model widget, as plain functions (no Qt).

Everything the user types is parsed here into engine calls; every problem is
raised as an :class:`~esegeta_engine.errors.EsegetaError` (problem + fix) for
the widget to show.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esegeta_engine.config import ExecutionConfig, PreprocessConfig
from esegeta_engine.errors import ConfigError, EsegetaError, ModelLoadError


@dataclass
class ModelRequest:
    """What the user asked for in the Model widget.

    Attributes
    ----------
    path : str
        TorchScript file or state dict, or an nnU-Net results folder or MONAI bundle folder.
    class_path : str
        ``package.module:Class`` for a state dict ("" for TorchScript).
    kwargs : dict
        Constructor keyword arguments of ``class_path``.
    device : str
        ``cpu`` or ``cuda:N``.
    output : int, str or None
        Output selection.
    preprocess : PreprocessConfig
        Input preparation.
    name : str
        Short name shown in the widgets.
    class_names : tuple of str
        Names of the output classes by index (empty when unknown).
    """

    path: str
    class_path: str = ""
    kwargs: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    output: int | str | None = None
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    name: str = ""
    trust_pickled: bool = False
    class_names: tuple[str, ...] = ()
    trust_bundle: bool = False

    @property
    def label(self) -> str:
        """The name, or the file name."""
        return self.name or Path(self.path).name


def parse_kwargs(text: str) -> dict[str, Any]:
    """Constructor kwargs from JSON text ("" -> {}).

    Raises
    ------
    ModelLoadError
        If the text is not a JSON object.
    """
    text = (text or "").strip()
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"the model kwargs are not valid JSON: {exc.msg} (line {exc.lineno}, "
                             f"column {exc.colno})",
                             'write a JSON object, e.g. {"in_channels": 1, "out_channels": 2}') from None
    if not isinstance(value, dict):
        raise ModelLoadError(f"the model kwargs must be a JSON object, not {type(value).__name__}",
                             'write e.g. {"in_channels": 1}')
    return value


def parse_output(text: str) -> int | str | None:
    """Output selection: "" -> None, digits -> int, anything else -> dict key."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        return text


def make_preprocess(normalisation: str, axis_order: str, in_channels: int = 1) -> PreprocessConfig:
    """Validated :class:`PreprocessConfig` (``spatial_dims`` follows ``axis_order``).

    Raises
    ------
    ConfigError
        On a bad combination, with the engine's message.
    """
    from pydantic import ValidationError

    from esegeta_engine.config import format_validation_error

    try:
        return PreprocessConfig(normalisation=normalisation, axis_order=axis_order,
                                spatial_dims=len(axis_order), in_channels=in_channels)
    except ValidationError as exc:
        raise format_validation_error(exc, "preprocessing") from None


def normalisation_choices() -> list[str]:
    """Allowed normalisations, from the engine's config schema."""
    ann = PreprocessConfig.model_fields["normalisation"].annotation
    return list(getattr(ann, "__args__", ())) or ["none"]


def axis_order_choices() -> list[str]:
    """All 3D then 2D axis orders."""
    return ["".join(p) for p in itertools.permutations("xyz")] + ["xy", "yx"]


def available_devices() -> list[str]:
    """``cpu`` plus ``cuda:N`` for every visible GPU."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ["cpu"] + [f"cuda:{i}" for i in range(n)]


def bundled_request(device: str = "cpu") -> ModelRequest:
    """The engine's bundled 3D vessel U-Net as a state dict + class request.

    Raises
    ------
    ModelLoadError
        If the sample weights are not installed.
    """
    from esegeta_engine import sample

    try:
        info = sample.sample_info()
        entry = info["models"]["unet3d_vessels"]
        path = sample.unet_paths()["state"]
    except (OSError, KeyError, ValueError) as exc:
        raise ModelLoadError(f"the bundled sample model is not installed ({exc.__class__.__name__}: {exc})",
                             "reinstall napari-esegeta, or run `python -m esegeta_engine.sample.train`") from None
    pre = info.get("preprocess", {})
    return ModelRequest(
        path=str(path), class_path=entry["class_path"], kwargs=dict(entry.get("kwargs", {})),
        device=device, output=None, name="bundled vessel U-Net",
        class_names=tuple(str(c) for c in entry.get("classes", ())),
        preprocess=make_preprocess(pre.get("normalisation", "minmax"), pre.get("axis_order", "xyz")),
    )


def parse_class_names(text: str) -> tuple[str, ...]:
    """``"background, vessel"`` -> ``("background", "vessel")`` (index order; empty: unknown)."""
    return tuple(t.strip() for t in text.replace(";", ",").split(",") if t.strip())


PRECISIONS = ("fp32", "bf16", "fp16")


def parse_execution(patch_text: str, precision: str = "fp32", overlap: float = 0.25) -> ExecutionConfig | None:
    """The Model tab's execution fields -> an :class:`ExecutionConfig` (``None``: whole volume, fp32).

    ``patch_text`` is empty (whole volume), one size (``"96"``) or one per axis (``"96, 96, 64"``).

    Raises
    ------
    ConfigError
        A patch size that is not a positive whole number, or a bad precision.
    """
    text = patch_text.replace(";", ",").replace("x", ",").strip()
    if not text and precision == "fp32":
        return None
    try:
        sizes = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"patch size {patch_text!r} is not a list of whole numbers",
                          "type e.g. 96 or 96, 96, 64 (the network's training patch size), or leave it empty") from None
    if any(s < 1 for s in sizes) or len(sizes) > 3:
        raise ConfigError(f"patch size {patch_text!r} needs one to three positive sizes",
                          "type e.g. 96 or 96, 96, 64, or leave it empty for whole-volume execution")
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is unknown", "choose fp32, bf16 or fp16")
    patch: Any = None if not sizes else (sizes[0] if len(sizes) == 1 else sizes)
    return ExecutionConfig(patch_size=patch, overlap=overlap, precision=precision)


def load_request(req: ModelRequest) -> Any:
    """Load the model of ``req`` (runs in a worker thread).

    Raises
    ------
    EsegetaError
        From the engine (missing file, not a model, state dict that does not fit).
    """
    return load_request_pair(req)[1]


def load_request_pair(req: ModelRequest) -> tuple[ModelRequest, Any]:
    """Load ``req``'s model; a folder (nnU-Net, MONAI bundle) goes through the engine's registered
    sources, and the request comes back with the preprocessing and class names the folder states."""
    import dataclasses

    from esegeta_engine.models import load_model

    if req.path and Path(req.path).is_dir():
        from esegeta_engine.config import ModelConfig
        from esegeta_engine.models import Trust, detect_source, load_source

        kind = detect_source(req.path)
        if kind not in ("nnunet", "bundle"):
            raise ModelLoadError(f"{req.path} is neither an nnU-Net results folder (plans.json, dataset.json, "
                                 "fold_N/) nor a MONAI bundle (configs/, models/)",
                                 "choose a model file, or the folder nnUNetv2_train wrote")
        loaded = load_source(ModelConfig(**{kind: req.path}, device=req.device),
                             Trust(pickled=req.trust_pickled, bundle=req.trust_bundle))
        preprocess = req.preprocess.model_copy(update=loaded.preprocess)
        names = tuple(loaded.class_names or req.class_names)
        return dataclasses.replace(req, preprocess=preprocess, class_names=names), loaded.module
    if not req.path:
        raise ModelLoadError("no model file given", "choose a TorchScript (.pt) or state dict file, "
                             "or click 'Use bundled sample model'")
    return req, load_model(req.path, class_path=req.class_path or None, kwargs=req.kwargs, device=req.device,
                           trust_pickled=req.trust_pickled)


def own_window(model: Any) -> str | None:
    """How a deployed pipeline (nnU-Net folder, MONAI bundle) runs its network, or None for a plain model.

    Such a pipeline runs its own sliding window (nnU-Net's patch, step, mirroring and folds; a
    bundle's inferer) on its own grid: a patch size typed in the Model tab must not be added on top.
    """
    describe = getattr(model, "describe_execution", None)
    if not callable(describe):
        return None
    d = describe()
    if d.get("pipeline") == "nnunet":
        return (f"nnU-Net's own window: patch {d.get('patch_size')}, step {d.get('step_size')}, "
                f"{d.get('network_calls_per_patch')} network call(s) per patch (mirrors x folds)")
    if d.get("patch_size"):
        return (f"the bundle's {d.get('inferer')}: patch {d.get('patch_size')}, overlap {d.get('overlap')}, "
                f"{d.get('blend')} blending")
    return f"the bundle's {d.get('inferer', 'own inferer')} on its preprocessed grid"


#: module kinds that are a non-linearity (their output is what the next layer sees)
ACTIVATIONS = ("ReLU", "LeakyReLU", "PReLU", "ReLU6", "ELU", "SELU", "CELU", "GELU", "SiLU", "Mish", "Hardswish",
               "Softplus", "Tanh", "Sigmoid")


def default_layer(layers: list[tuple[str, str]]) -> str | None:
    """A default layer for layer methods whose maps localise: the last non-linearity before the head.

    Grad-CAM keeps the positive part of a gradient-weighted channel sum. On a raw convolution
    output (signed everywhere, before its norm and activation) that sum stays positive over much
    of the background: on the bundled U-Net, Grad-CAM of the last convolution before the head
    paints 40 % of the field of view with 10 % of its mass inside the vessels; at the decoder's
    last activation (the same block's output) 99 % of the mass is inside the vessels (phantom
    48³, ROC AUC 0.96). Without activations: the last convolution but one (before the head).
    """
    acts = [i for i, (_, kind) in enumerate(layers) if kind in ACTIVATIONS]
    heads = [i for i, (_, kind) in enumerate(layers) if kind.startswith("Conv")]
    if acts and heads and acts[-1] < heads[-1]:
        return layers[acts[-1]][0]
    convs = [name for name, kind in layers if kind.startswith("Conv")]
    if len(convs) >= 2:
        return convs[-2]
    return convs[-1] if convs else (layers[-1][0] if layers else None)


def format_error(exc: BaseException) -> str:
    """Readable text for the widgets: problem and fix, never a traceback."""
    if isinstance(exc, EsegetaError):
        return exc.problem + (f"\n→ {exc.fix}" if exc.fix else "")
    if isinstance(exc, ConfigError):  # pragma: no cover - subclass of EsegetaError
        return str(exc)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:500]
