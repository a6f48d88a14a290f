"""Build a trusted MONAI bundle's deployed pipeline with MONAI's own ``ConfigParser``.

Only called after the trust gate of :mod:`.bundle` (the parser evaluates ``$`` expressions
and instantiates ``_target_`` objects). The network is ``network_def`` with the weights of
``models/model.pt`` (read with ``weights_only=True``; a plain state dict or MONAI's
``{"model": state_dict}``) or, without it, the TorchScript ``models/model.ts``; the
transforms are the parsed ``preprocessing`` / ``postprocessing`` and the inferer
``inferer``. Class names come from ``configs/metadata.json``'s output channel definition.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from esegeta_engine.errors import ModelLoadError
from esegeta_engine.models.devices import resolve_device
from esegeta_engine.models.files import mismatch, read_weights
from esegeta_engine.models.sources import LoadedModel, Trust


def build_pipeline(folder: Path, config_path: Path, cfg: Any, trust: Trust) -> LoadedModel:
    """The bundle's pipeline as a :class:`LoadedModel` (see the module docstring).

    Raises
    ------
    ModelLoadError
        Naming the part of the bundle that cannot be built, loaded or explained, and the fix.
    """
    from monai.bundle import ConfigParser

    from esegeta_engine.models.bundle_pipeline import BundlePipeline
    from esegeta_engine.models.bundle_steps import BundleSteps, window_settings

    dev = resolve_device(cfg.device)
    parser = ConfigParser()
    parser.read_config(str(config_path))
    parser["bundle_root"] = str(folder)
    ensemble = _ensemble(parser.get(""))
    if ensemble:
        raise ModelLoadError(f"{config_path} defines an ensemble ({ensemble}); only its network_def would be "
                             "explained, not the ensemble it deploys",
                             "explain each member network with a copy of the config whose network_def and weights "
                             "are that member's (a cohort's models: list compares them)")
    network, weights = _network(parser, folder, config_path, dev, trust)
    pre, post, inferer = (_parsed(parser, key, config_path) for key in ("preprocessing", "postprocessing", "inferer"))
    steps = BundleSteps.of(pre, post)
    settings, inferer_record = window_settings(inferer)
    meta = read_metadata(folder)
    net_def = parser.get("network_def") or {}
    spatial_dims = int(net_def.get("spatial_dims", 3)) if isinstance(net_def, dict) else 3
    module = BundlePipeline(network, steps, settings, inferer_record)
    n_in = meta["channels"] or module.network_in_channels()
    steps.probe(n_in, spatial_dims)
    description = {
        "source": "bundle", "path": str(folder), "config": str(config_path.relative_to(folder)),
        "network": net_def.get("_target_") if isinstance(net_def, dict) else None, "weights": weights,
        **{f"inferer_{k}" if k != "inferer" else k: v for k, v in inferer_record.items()},
        "preprocessing": [type(t).__name__ for t in steps.pre], "skipped": steps.skipped,
        "activation": steps.activation, "inversion": "Invertd" if steps.inverted else "preprocessing inverse",
        "classes": meta["classes"],
    }
    return LoadedModel(module.eval(), "bundle", description, meta["classes"],
                       preprocess={"spatial_dims": spatial_dims, "in_channels": n_in, "normalisation": "none",
                                   "axis_order": "xyz"[:spatial_dims], "orientation": None},
                       grid="scan", execution={"mode": "whole", "divisible_by": 1},
                       outputs="probabilities" if steps.activation else "logits",
                       input_note=f"the bundle's network takes {n_in} input channel(s)")


def read_metadata(folder: Path) -> dict[str, Any]:
    """Class names and input channels from ``configs/metadata.json`` (plain JSON, nothing run)."""
    path = folder / "configs" / "metadata.json"
    out: dict[str, Any] = {"classes": None, "channels": None}
    if not path.is_file():
        return out
    try:
        fmt = json.loads(path.read_text(encoding="utf-8")).get("network_data_format", {})
    except (ValueError, AttributeError):
        raise ModelLoadError(f"{path} cannot be read as JSON", "restore the bundle's metadata.json") from None
    pred = (fmt.get("outputs") or {}).get("pred") or {}
    channel_def = pred.get("channel_def") or {}
    if isinstance(channel_def, dict) and channel_def:
        try:
            out["classes"] = [str(channel_def[k]) for k in sorted(channel_def, key=lambda k: int(k))]
        except ValueError:
            out["classes"] = [str(v) for v in channel_def.values()]
    image = (fmt.get("inputs") or {}).get("image") or {}
    if isinstance(image.get("num_channels"), int):
        out["channels"] = int(image["num_channels"])
    return out


ENSEMBLE_TARGETS = ("EnsembleEvaluator", "MeanEnsembled", "VoteEnsembled", "MeanEnsemble", "VoteEnsemble")


def _ensemble(node: Any) -> str | None:
    """The first ensemble ``_target_`` in a raw bundle config (None: a single network)."""
    if isinstance(node, dict):
        target = node.get("_target_")
        if isinstance(target, str) and target.rsplit(".", 1)[-1] in ENSEMBLE_TARGETS:
            return target
        node = list(node.values())
    if isinstance(node, list):
        return next((found for found in map(_ensemble, node) if found), None)
    return None


def _parsed(parser: Any, key: str, config_path: Path) -> Any:
    if parser.get(key) is None:
        return None
    try:
        return parser.get_parsed_content(key)
    except Exception as exc:  # noqa: BLE001 - whatever the bundle's objects raise
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{config_path}: '{key}' cannot be built by MONAI's bundle parser ({first})",
                             "check the bundle's config and that the packages it names are installed") from None


def _network(parser: Any, folder: Path, config_path: Path, dev: torch.device, trust: Trust) -> tuple[nn.Module, str]:
    """``network_def`` with ``models/model.pt``'s weights, or the TorchScript ``models/model.ts``."""
    pt, ts = folder / "models" / "model.pt", folder / "models" / "model.ts"
    if not pt.is_file() and ts.is_file():
        try:
            return torch.jit.load(str(ts), map_location=dev).eval(), "models/model.ts"
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(f"{ts} cannot be loaded as TorchScript ({type(exc).__name__})",
                                 "restore the bundle's model.ts or add models/model.pt") from None
    network = _parsed(parser, "network_def", config_path)
    if not isinstance(network, nn.Module):
        raise ModelLoadError(f"{config_path}: network_def builds a {type(network).__name__}, not a network",
                             "give network_def as a MONAI or torch network (_target_ and its arguments)")
    state = read_weights(pt, torch.device("cpu"), trust.pickled, name=str(pt))
    if isinstance(state, dict) and isinstance(state.get("model"), dict) and len(state) == 1:
        state = state["model"]  # MONAI's CheckpointSaver layout
    if not isinstance(state, dict):
        raise ModelLoadError(f"{pt} does not hold a state dict but a {type(state).__name__}",
                             "save the network's state_dict() as models/model.pt")
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError:
        raise ModelLoadError(f"the weights in {pt} do not fit network_def: {mismatch(network.state_dict(), state)}",
                             "check network_def's arguments (channels, features) match the saved network") from None
    return network.to(dev).eval(), "models/model.pt"
