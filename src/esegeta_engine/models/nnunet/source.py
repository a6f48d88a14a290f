"""The nnU-Net v2 source: ``model: {nnunet: DIR, configuration, folds, checkpoint, mirroring}``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from esegeta_engine.models.devices import resolve_device
from esegeta_engine.models.nnunet.folder import build_networks, is_nnunet_folder, read_folder, require_nnunet
from esegeta_engine.models.sources import LoadedModel, ModelSource, Trust, register_source


def load_nnunet(cfg: Any, trust: Trust) -> LoadedModel:
    """Read the folder, build each fold's network and wrap them as the deployed pipeline."""
    from esegeta_engine.models.nnunet.pipeline import NnUNetPipeline

    dev = resolve_device(cfg.device)
    folder = read_folder(Path(cfg.nnunet), cfg.configuration, cfg.folds, cfg.checkpoint, trust.pickled)
    require_nnunet()
    networks, pm, cm, lm = build_networks(folder, dev)
    axes = folder.checkpoints[0].mirror_axes if cfg.mirroring else None
    module = NnUNetPipeline(networks, pm, cm, lm, axes).eval()
    module.fold_names = [str(f) for f in folder.folds]
    description = {
        "source": "nnunet", "path": str(folder.path), "configuration": folder.configuration,
        "folds": [str(f) for f in folder.folds],
        "folds_choice": "given (model.folds)" if folder.folds_given else "every trained fold found",
        "checkpoint": cfg.checkpoint, "trainer": folder.checkpoints[0].trainer_name,
        "mirroring": bool(cfg.mirroring),
        "mirroring_choice": "deployed (the checkpoint's axes)" if cfg.mirroring
        else "off (model.mirroring: false): a faster function than the deployed one",
        "mirror_axes": list(axes or []), "checkpoint_mirror_axes": list(folder.checkpoints[0].mirror_axes or []),
        "channels": folder.channel_names, "classes": folder.class_names,
        "region_based": bool(lm.has_regions), "patch_size": list(cm.patch_size), "spacing": list(cm.spacing),
        "normalisation": list(cm.normalization_schemes),
    }
    n_in = len(folder.channel_names) or 1
    return LoadedModel(module, "nnunet", description, folder.class_names,
                       preprocess={"spatial_dims": 3, "in_channels": n_in, "normalisation": "none",
                                   "axis_order": "xyz", "orientation": None},
                       grid="scan", execution={"mode": "whole", "divisible_by": 1}, outputs="probabilities",
                       input_note=f"{folder.path / 'dataset.json'} lists {n_in} input channel(s) "
                                  f"({', '.join(folder.channel_names)})")


def _detect(path: Path) -> bool:
    return is_nnunet_folder(path)


NNUNET = register_source(ModelSource("nnunet", _detect, load_nnunet))
__all__ = ["NNUNET", "load_nnunet", "require_nnunet"]
