"""Command-line flags naming a model source (explain, layers, predict) and ``esegeta predict``'s parser.

Imports nothing heavy: ``esegeta --help`` must not import torch.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from esegeta_engine.errors import ConfigError
from esegeta_engine.yamlsafe import load_bounded


def add_source_flags(p: argparse.ArgumentParser, model_required: bool = False) -> None:
    """``--model FILE | --nnunet DIR | --bundle DIR`` and their options; the trust flags."""
    if not any(a.dest == "model" for a in p._actions):
        p.add_argument("--model", required=model_required, help="TorchScript file or state dict")
    if not any(a.dest == "format" for a in p._actions):
        p.add_argument("--format", default="auto", choices=["auto", "torchscript", "state_dict", "pickled_module"],
                       help="how to read the model file (default: detected)")
        p.add_argument("--class-path", help="package.module:Class, for a state dict")
        p.add_argument("--kwargs", help="constructor kwargs of --class-path as JSON")
        p.add_argument("--trust-pickled", action="store_true",
                       help="allow loading a fully pickled nn.Module (runs code from the file)")
    if not any(a.dest == "device" for a in p._actions):
        p.add_argument("--device", default="cpu", help="cpu or cuda:N (default cpu)")
    if not any(a.dest == "output" for a in p._actions):
        p.add_argument("--output", help="output index/key of a multi-output model")
    p.add_argument("--nnunet", help="nnU-Net v2 results folder (plans.json, dataset.json, fold_N/)")
    p.add_argument("--configuration", default="3d_fullres", help="nnU-Net configuration (default 3d_fullres)")
    p.add_argument("--folds", nargs="+", help="nnU-Net folds to ensemble (default: every trained fold; 'all')")
    p.add_argument("--checkpoint", default="checkpoint_final.pth", help="nnU-Net checkpoint name per fold")
    p.add_argument("--no-mirroring", action="store_true",
                   help="nnU-Net: no test-time mirroring (faster; not the deployed function)")
    p.add_argument("--bundle", help="MONAI bundle folder (configs/inference.json, models/model.pt)")
    p.add_argument("--bundle-config", default="configs/inference.json", help="bundle: inference config")
    p.add_argument("--trust-bundle", action="store_true",
                   help="allow a bundle config's Python ($ expressions, _target_ objects) to run")


def model_section(args: argparse.Namespace) -> dict[str, Any]:
    """The config's ``model`` section the flags describe.

    Raises
    ------
    ConfigError
        If none or more than one of --model, --nnunet, --bundle is given.
    """
    if getattr(args, "model", None) and Path(args.model).is_dir():  # a folder: which kind it is
        from esegeta_engine.models.sources import detect_source

        kind = detect_source(args.model)
        if kind not in ("nnunet", "bundle"):
            raise ConfigError(f"{args.model} is a folder but neither an nnU-Net results folder (plans.json, "
                              "dataset.json, fold_N/) nor a MONAI bundle (configs/, models/)",
                              "give a model file, --nnunet DIR or --bundle DIR")
        setattr(args, kind, args.model)
        args.model = None
    given = [f"--{k}" for k in ("model", "nnunet", "bundle") if getattr(args, k, None)]
    if len(given) != 1:
        raise ConfigError("give one model: --model FILE, --nnunet DIR or --bundle DIR"
                          + (f" (got {' and '.join(given)})" if given else ""),
                          "see `esegeta explain --help`")
    data: dict[str, Any] = {"device": getattr(args, "device", "cpu") or "cpu"}
    if getattr(args, "output", None) is not None:
        from esegeta_engine.cli_commands import _parse_value

        data["output"] = _parse_value(args.output)
    if args.nnunet:
        data.update(nnunet=args.nnunet, configuration=args.configuration, checkpoint=args.checkpoint,
                    mirroring=not args.no_mirroring)
        if args.folds:
            data["folds"] = ("all" if args.folds == ["all"] else
                             [f if f == "all" else int(f) for f in args.folds])
    elif args.bundle:
        data.update(bundle=args.bundle, config=args.bundle_config)
    else:
        data.update(path=args.model, format=args.format)
        if args.class_path:
            data["class_path"] = args.class_path
        if args.kwargs:
            data["kwargs"] = load_bounded(args.kwargs, source="--kwargs", json_syntax=True)
    return data


def model_config_from_args(args: argparse.Namespace) -> Any:
    """A validated :class:`~esegeta_engine.config.ModelConfig` from the flags (paths against the cwd)."""
    from pydantic import ValidationError

    from esegeta_engine.config import ModelConfig

    data = model_section(args)
    for key in ("path", "nnunet", "bundle"):
        if data.get(key):
            data[key] = str(Path(data[key]).resolve())
    try:
        return ModelConfig(**data)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(f"model: {first.get('msg')}", "check the model flags") from None


def _run_predict(args: argparse.Namespace) -> int:
    from esegeta_engine.predict import cmd_predict

    return cmd_predict(args)


def add_input_flags(p: argparse.ArgumentParser) -> None:
    """How a scan becomes a model file's input (``explain`` and ``predict`` read it the same way)."""
    p.add_argument("--spatial-dims", type=int, default=3, choices=[2, 3], help="2D images or 3D volumes (default 3)")
    p.add_argument("--in-channels", type=int, default=1,
                   help="model input channels (default 1; several: a 4D NIfTI, channels last)")
    p.add_argument("--normalisation", default="none", choices=["none", "zscore", "minmax", "percentile"],
                   help="intensity normalisation before a model file (default none)")
    p.add_argument("--axis-order", help="model spatial axes in NIfTI terms (default xyz, or xy for 2D)")


def add_predict_parser(sub: Any) -> None:
    """Register ``esegeta predict`` (one line in the CLI)."""
    p = sub.add_parser("predict", help="label map and per-class probabilities on each scan's grid")
    p.add_argument("--volume", action="append", required=True, help="NIfTI input (repeatable)")
    p.add_argument("--out", default="esegeta_predictions", help="output folder (default esegeta_predictions)")
    add_input_flags(p)
    p.add_argument("--patch-size", type=int, nargs="+", help="sliding-window patch size of a model file")
    p.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap in [0, 1)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="autocast precision of the network")
    p.add_argument("--orientation", help="reorient volumes to these axis codes first, e.g. RAS (as explain)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines (the written files are still listed)")
    add_source_flags(p)
    p.set_defaults(func=_run_predict)
