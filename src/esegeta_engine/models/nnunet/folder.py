"""Read an nnU-Net v2 results folder: plans, dataset, folds, checkpoints, networks.

Every problem is one line naming the file and the fix; nothing is built before the
folder has been checked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from esegeta_engine.errors import ModelLoadError
from esegeta_engine.models.files import read_weights

CASCADE_HINT = "explain the low-resolution stage (3d_lowres) or a full-resolution configuration instead"


def require_nnunet() -> None:
    """Import nnunetv2 or say how to install it."""
    try:
        import nnunetv2  # noqa: F401
    except ImportError:
        raise ModelLoadError("nnU-Net v2 folders need the nnunetv2 package, which is not installed",
                             "pip install 'napari-esegeta[nnunet]' (keeping your torch build)") from None


def is_nnunet_folder(path: Path) -> bool:
    """A folder with plans.json, dataset.json and at least one fold_* folder."""
    return (path.is_dir() and (path / "plans.json").is_file() and (path / "dataset.json").is_file()
            and any(path.glob("fold_*")))


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ModelLoadError(f"{path} does not exist: an nnU-Net results folder holds {what}",
                             "point --nnunet / model.nnunet at the folder nnUNetv2_train wrote "
                             "(nnUNet_results/Dataset001_Name/Trainer__Plans__configuration)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path} cannot be read as JSON ({exc})", "restore the file nnU-Net wrote") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} does not hold a JSON object", "restore the file nnU-Net wrote")
    return data


def _safe_numpy_globals() -> list[Any]:
    """Numpy data reconstructors nnU-Net's training log holds (data, never code)."""
    import numpy.core.multiarray as multiarray

    found: list[Any] = [multiarray.scalar, np.dtype]
    found += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "bool")]
    return found


@dataclass
class FoldCheckpoint:
    """One fold's weights and what its checkpoint says about inference."""

    fold: int | str
    path: Path
    weights: dict[str, torch.Tensor]
    trainer_name: str
    configuration: str | None
    mirror_axes: tuple[int, ...] | None


def read_checkpoint(path: Path, fold: int | str, trust_pickled: bool) -> FoldCheckpoint:
    """Read one fold's checkpoint with ``weights_only=True`` (numpy scalars of the log allowed).

    Raises
    ------
    PickledModuleError
        Naming the object the file needs and the ``--trust-pickled`` choice.
    """
    with torch.serialization.safe_globals(_safe_numpy_globals()):
        ckpt = read_weights(path, torch.device("cpu"), trust_pickled, name=str(path))
    if not isinstance(ckpt, dict) or "network_weights" not in ckpt:
        raise ModelLoadError(f"{path} is not an nnU-Net checkpoint (no 'network_weights')",
                             "give the checkpoint nnUNetv2_train wrote (model.checkpoint: checkpoint_final.pth)")
    init = ckpt.get("init_args") or {}
    axes = ckpt.get("inference_allowed_mirroring_axes")
    return FoldCheckpoint(fold, path, dict(ckpt["network_weights"]), str(ckpt.get("trainer_name", "nnUNetTrainer")),
                          init.get("configuration") if isinstance(init, dict) else None,
                          None if axes is None else tuple(int(a) for a in axes))


@dataclass
class NnUNetFolder:
    """A checked nnU-Net v2 results folder and the chosen configuration, folds and checkpoint."""

    path: Path
    plans: dict[str, Any]
    dataset: dict[str, Any]
    configuration: str
    folds: list[int | str]
    checkpoints: list[FoldCheckpoint] = field(default_factory=list)
    folds_given: bool = False

    @property
    def channel_names(self) -> list[str]:
        """Input channel names from dataset.json (``channel_names``, or the old ``modality``)."""
        names = self.dataset.get("channel_names") or self.dataset.get("modality") or {}
        return [str(names[k]) for k in sorted(names, key=lambda k: int(k))]

    @property
    def class_names(self) -> list[str]:
        """Output channel names: labels by value, or the regions (region-based training)."""
        labels = self.dataset.get("labels") or {}
        regions = any(isinstance(v, (list, tuple)) and len(v) > 1 for v in labels.values())
        items = sorted(labels.items(), key=lambda kv: kv[1] if isinstance(kv[1], int) else
                       (kv[1][0] if isinstance(kv[1], (list, tuple)) and kv[1] else 0))
        if regions:
            return [k for k, v in items if v != 0 and v != [0]]
        return [k for k, _ in items]


def read_folder(path: Path, configuration: str, folds: Any, checkpoint: str,
                trust_pickled: bool = False) -> NnUNetFolder:
    """Check ``path`` and read plans, dataset and each requested fold's checkpoint.

    Raises
    ------
    ModelLoadError
        One line naming the missing or wrong file and the fix.
    """
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"nnU-Net folder {str(path)!r} does not exist", "check --nnunet / model.nnunet")
    plans = _read_json(path / "plans.json", "plans.json")
    dataset = _read_json(path / "dataset.json", "dataset.json")
    configs = plans.get("configurations") or {}
    if configuration not in configs:
        raise ModelLoadError(f"{path / 'plans.json'} has no configuration {configuration!r} "
                             f"(it has {', '.join(configs) or 'none'})",
                             "set model.configuration to one of those (the one this folder was trained with)")
    if configs[configuration].get("previous_stage") or "cascade" in configuration:
        raise ModelLoadError(f"configuration {configuration!r} in {path / 'plans.json'} is a cascade stage: it "
                             "needs the previous stage's segmentation as input, which is not explained here",
                             CASCADE_HINT)
    given = folds is not None
    if folds is None:
        folds = sorted(int(p.name.split("_")[-1]) for p in path.glob("fold_*")
                       if p.name != "fold_all" and p.name.split("_")[-1].isdigit() and (p / checkpoint).is_file())
        if not folds and (path / "fold_all" / checkpoint).is_file():
            folds = ["all"]
        if not folds:
            raise ModelLoadError(f"no fold_N/{checkpoint} in {path}",
                                 "train a fold first, or set model.checkpoint (e.g. checkpoint_best.pth)")
    elif folds == "all":
        folds = ["all"]
    folder = NnUNetFolder(path, plans, dataset, configuration, list(folds), folds_given=given)
    for f in folder.folds:
        ckpt_path = path / f"fold_{f}" / checkpoint
        if not ckpt_path.is_file():
            raise ModelLoadError(f"{ckpt_path} does not exist",
                                 "choose folds that were trained (model.folds) or another model.checkpoint")
        folder.checkpoints.append(read_checkpoint(ckpt_path, f, trust_pickled))
    trained = {c.configuration for c in folder.checkpoints if c.configuration}
    if trained and configuration not in trained:
        raise ModelLoadError(f"the checkpoints in {path} were trained with configuration {sorted(trained)[0]!r}, "
                             f"not {configuration!r}", f"set model.configuration: {sorted(trained)[0]}")
    return folder


def build_networks(folder: NnUNetFolder, device: torch.device) -> tuple[nn.ModuleList, Any, Any, Any]:
    """Each fold's network, built by nnU-Net's own trainer class from the plans.

    Returns
    -------
    networks, plans_manager, configuration_manager, label_manager
    """
    require_nnunet()
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(folder.plans)
    cm = pm.get_configuration(folder.configuration)
    lm = pm.get_label_manager(folder.dataset)
    n_in = determine_num_input_channels(pm, cm, folder.dataset)
    name = folder.checkpoints[0].trainer_name
    try:
        trainer = recursive_find_trainer_class_by_name(name)
    except Exception:
        trainer = None
    if trainer is None:
        raise ModelLoadError(f"the checkpoints in {folder.path} were trained with trainer class {name!r}, which "
                             "nnU-Net cannot locate", "install the package that defines it into nnunetv2's trainer "
                             "folder (as for nnUNetv2_predict), or set nnUNet_extTrainer")
    nets = nn.ModuleList()
    for ck in folder.checkpoints:
        try:
            net = trainer.build_network_architecture(pm, cm, n_in, lm.num_segmentation_heads,
                                                     enable_deep_supervision=False)
        except TypeError:
            net = trainer.build_network_architecture(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                                     cm.network_arch_init_kwargs_req_import, n_in,
                                                     lm.num_segmentation_heads, enable_deep_supervision=False)
        try:
            net.load_state_dict(ck.weights)
        except RuntimeError as exc:
            raise ModelLoadError(f"{ck.path} does not fit the network the plans describe "
                                 f"({str(exc).splitlines()[0]})",
                                 "check model.configuration and that plans.json belongs to these checkpoints") from None
        for p in net.parameters():
            p.requires_grad_(False)  # our own copies: attribution needs input gradients only
        nets.append(net.to(device).eval())
    return nets, pm, cm, lm
