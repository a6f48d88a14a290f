"""The MONAI-bundle source: ``model: {bundle: DIR, config: configs/inference.json}``.

A bundle config can execute Python: ``$`` expressions are evaluated and ``_target_``
entries import and call arbitrary objects when MONAI's parser instantiates them. Nothing
in a bundle runs unless the person running the command says so (``--trust-bundle``, a
confirmation in napari naming the folder); without it the bundle is refused with one line
naming what would run. The config is read as plain JSON/YAML data for that check (never
parsed by MONAI before trust is given).

Once trusted, :mod:`.bundle_load` parses the config with MONAI's own ``ConfigParser`` and
builds the deployed function (:class:`~.bundle_pipeline.BundlePipeline`): the network with
its weights, the preprocessing transforms, the inferer, the activation and ``Invertd``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from esegeta_engine.errors import BundleTrustError, ModelLoadError
from esegeta_engine.models.sources import LoadedModel, ModelSource, Trust, register_source
from esegeta_engine.yamlsafe import load_bounded

WEIGHTS = ("models/model.pt", "models/model.ts")


def is_bundle_folder(path: Path) -> bool:
    """A folder with ``configs/`` holding an inference config and a ``models/`` folder."""
    return path.is_dir() and (path / "configs").is_dir() and any(
        (path / "configs" / n).is_file() for n in ("inference.json", "inference.yaml", "inference.yml"))


def read_config(path: Path) -> dict[str, Any]:
    """The bundle config as plain data (JSON or YAML, nothing evaluated)."""
    if not path.is_file():
        raise ModelLoadError(f"{path} does not exist: a MONAI bundle's inference config is needed",
                             "point --bundle at the bundle folder, or set model.config to its inference config")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else load_bounded(text, source=path.name)
    except (ValueError, Exception) as exc:  # noqa: B014 - JSON or YAML errors
        raise ModelLoadError(f"{path} cannot be read ({exc})", "restore the bundle's config") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} does not hold a config object", "restore the bundle's config")
    return data


def executable_entries(node: Any, where: str = "") -> Iterator[str]:
    """Every place the config would run Python: ``$`` expressions, ``_target_`` objects, imports."""
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{where}.{key}" if where else str(key)
            if key == "_target_":
                yield f"{where or 'config'}: _target_ {value}"
            elif key == "imports":
                yield f"imports {value}"
            else:
                yield from executable_entries(value, here)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from executable_entries(value, f"{where}[{i}]")
    elif isinstance(node, str) and node.startswith("$"):
        yield f"{where}: {node[:60]}"


def load_bundle(cfg: Any, trust: Trust) -> LoadedModel:
    """Check the bundle folder and the trust decision, then build the pipeline (module docstring).

    Raises
    ------
    ModelLoadError
        Naming the missing file, what the config would run, or what is not supported.
    """
    folder = Path(cfg.bundle)
    if not folder.is_dir():
        raise ModelLoadError(f"bundle folder {str(folder)!r} does not exist", "check --bundle / model.bundle")
    config_path = folder / cfg.config
    data = read_config(config_path)
    if "network_def" not in data:
        raise ModelLoadError(f"{config_path} has no 'network_def' (the network to explain)",
                             "give the bundle's inference config (model.config), which defines network_def")
    if not any((folder / w).is_file() for w in WEIGHTS):
        raise ModelLoadError(f"{folder / WEIGHTS[0]} does not exist: the bundle has no trained weights",
                             "download the bundle with its weights (monai.bundle.download) or copy model.pt there")
    runs = list(executable_entries(data))
    if runs and not trust.bundle:
        shown = "; ".join(runs[:3]) + (f"; and {len(runs) - 3} more" if len(runs) > 3 else "")
        raise BundleTrustError(f"{config_path} would run Python when loaded ({shown})",
                             "if you trust the bundle, pass --trust-bundle (in napari, confirm loading it)")
    from esegeta_engine.models.bundle_load import build_pipeline

    return build_pipeline(folder, config_path, cfg, trust)


BUNDLE = register_source(ModelSource("bundle", is_bundle_folder, load_bundle))
