"""The ``esegeta`` command line: a thin layer over :mod:`esegeta_engine.pipeline`.

This module holds the parser and the entry point and imports nothing heavy, so that
``esegeta --help`` answers at once; the commands (:mod:`esegeta_engine.cli_commands`)
import torch, Captum and MONAI only when they run.

User errors (bad files, configs, models) print one message with the fix and
exit with status 2, without a traceback. Ctrl-C cancels between model
evaluations; finished maps and the manifest are kept.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import warnings
from pathlib import Path

from esegeta_engine import __version__
from esegeta_engine.cli_commands import (cmd_demo, cmd_evaluate, cmd_explain, cmd_layers, cmd_methods, cmd_report, cmd_run, cmd_sample, cmd_schema)
from esegeta_engine.cli_sources import add_input_flags, add_predict_parser, add_source_flags
from esegeta_engine.errors import EsegetaError
from esegeta_engine.jobs.registry import executor_names

# the registry's Family values, spelled out so that `esegeta --help` does not import torch
FAMILIES = ["gradient", "perturbation", "layer", "visualisation"]

log = logging.getLogger("esegeta_engine")

def _setup_logging(verbose: bool) -> None:
    for old in [h for h in log.handlers if getattr(h, "esegeta_cli", False)]:  # main() called again
        log.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.esegeta_cli = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    handler.setLevel(logging.INFO if verbose else logging.WARNING)


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", default="auto", choices=["auto", "torchscript", "state_dict", "pickled_module"],
                   help="how to read the model file (default: detected)")
    p.add_argument("--class-path", help="package.module:Class, for a state dict")
    p.add_argument("--kwargs", help="constructor kwargs of --class-path as JSON")
    p.add_argument("--trust-pickled", action="store_true",
                   help="allow loading a fully pickled nn.Module (runs code from the file)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="esegeta",
        description="Explain 2D/3D imaging models: attribution maps as NIfTI with the source geometry.")
    parser.add_argument("--version", action="version", version=f"napari-esegeta {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to the console")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run a JSON/YAML config")
    p.add_argument("config", type=Path, help="YAML or JSON config (a single run or a cohort); `esegeta schema`")
    p.add_argument("--out", help="output folder (overrides output.dir)")
    p.add_argument("--overwrite", action="store_true", help="write into a folder holding a previous run")
    p.add_argument("--resume", action="store_true",
                   help="continue a run in the same folder: keep maps that are complete and match their job "
                        "(same model, volumes, method and parameters); redo the rest (single runs and cohorts)")
    p.add_argument("--device", help="cpu or cuda:N (overrides model.device)")
    p.add_argument("--trust-pickled", action="store_true",
                   help="allow loading a fully pickled nn.Module (runs code from the file); "
                        "a config cannot ask for this")
    p.add_argument("--trust-bundle", action="store_true",
                   help="allow a MONAI bundle's config to run (its $ expressions and _target_ objects); "
                        "a config cannot ask for this")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (jobs, refused methods, model evaluations; a single run also times one "
                        "patch for its time and memory estimate) and write nothing")
    p.add_argument("--executor", choices=list(executor_names()),
                   help="who runs the jobs (overrides execution.executor, or cohort.executor for a cohort)")
    p.add_argument("--scheduler", help="Dask scheduler address for --executor dask")
    p.add_argument("--workers", type=int, help="CPU worker processes for --executor local")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("explain", help="one-off run from flags, no config file")
    p.add_argument("--model", help="TorchScript file or state dict (or --nnunet DIR / --bundle DIR)")
    _model_flags(p)
    p.add_argument("--volume", action="append", required=True, help="NIfTI input (repeatable)")
    p.add_argument("--method", action="append", required=True,
                   help="NAME or NAME:key=value,... (repeatable), e.g. occlusion:window=8")
    p.add_argument("--target", default="argmax",
                   choices=["argmax", "otsu", "roi", "voxel", "classification", "channel", "outcome"],
                   help="what each map explains (README, Targets; default argmax)")
    p.add_argument("--classes", type=int, nargs="+",
                   help="class indices to explain (default: every predicted foreground class)")
    p.add_argument("--activation", choices=["none", "softmax", "sigmoid"],
                   help="applied to the output first (default sigmoid for otsu, none otherwise)")
    p.add_argument("--roi-mask", help="NIfTI mask for --target roi")
    p.add_argument("--voxel", type=int, nargs="+", help="x y [z] for --target voxel")
    p.add_argument("--target-layer", help="module name for --target channel (`esegeta layers MODEL`)")
    p.add_argument("--channel", type=int, help="channel (filter) index for --target channel")
    p.add_argument("--ground-truth", help="NIfTI label image on the volume's grid for --target outcome")
    p.add_argument("--outcome", choices=["tp", "fp", "fn"],
                   help="for --target outcome: true positives, false positives or false negatives (default fn)")
    p.add_argument("--output", help="output index/key of a multi-output model")
    p.add_argument("--device", default="cpu", help="cpu or cuda:N (default cpu)")
    add_input_flags(p)
    p.add_argument("--seed", type=int, default=0, help="random seed of the run (default 0)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per method and target")
    p.add_argument("--out", default="esegeta_out", help="output folder (default esegeta_out)")
    p.add_argument("--overwrite", action="store_true", help="write into a folder holding a previous run")
    p.add_argument("--resume", action="store_true", help="keep finished, matching maps in --out; redo the rest")
    p.add_argument("--patch-size", type=int, nargs="+",
                   help="sliding-window execution with this patch size (one or one per axis)")
    p.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap in [0, 1)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="autocast precision of the network (maps that turn non-finite are redone in fp32)")
    p.add_argument("--orientation", help="reorient volumes to these axis codes first, e.g. RAS")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_source_flags(p)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("demo", help="explain the bundled 3D U-Net on a phantom TOF-MRA volume")
    p.add_argument("--out", default="esegeta_demo", help="output folder (default esegeta_demo)")
    p.add_argument("--seed", type=int, default=7, help="phantom seed")
    p.add_argument("--methods", help="methods joined by '+', e.g. saliency+occlusion:window=8")
    p.add_argument("--no-report", action="store_true", help="skip figures and report.html")
    p.add_argument("--overwrite", action="store_true",
                   help="replace another run in --out (an earlier demo run is replaced anyway)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("methods", help="list methods and their parameters")
    p.add_argument("name", nargs="?", help="one method: its parameters, defaults and allowed values")
    p.add_argument("--family", choices=FAMILIES, help="only this family")
    p.add_argument("--json", action="store_true", help="machine-readable, with every parameter")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("layers", help="list a model's module names (for layer methods)")
    p.add_argument("model", nargs="?", help="model file, nnU-Net folder or bundle folder")
    _model_flags(p)
    add_source_flags(p)
    p.set_defaults(func=cmd_layers)
    add_predict_parser(sub)

    p = sub.add_parser("sample", help="write the phantom volume and its vessel mask as NIfTI")
    p.add_argument("--out", default="esegeta_sample", help="output folder (default esegeta_sample)")
    p.add_argument("--seed", type=int, default=7, help="phantom seed (default 7, the demo's)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("report", help="write report.html (figures, metrics tables) for a run folder")
    p.add_argument("run_dir", help="a run's output folder (holds manifest.json)")
    p.add_argument("--mask", help="ground-truth NIfTI mask: adds localisation scores per map")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("evaluate", help="re-evaluate a finished run's maps (same execution); update records, report")
    p.add_argument("run_dir", help="a run's output folder (holds manifest.json)")
    p.add_argument("--metrics", help="comma-separated: axioms,infidelity,sensitivity,faithfulness,class_contrast "
                                     "(default: the run's evaluation section)")
    p.add_argument("--mask", help="ground-truth NIfTI mask: adds localisation scores per map")
    p.add_argument("--randomisation", choices=["cascading", "independent", "both"],
                   help="also run the model-randomisation check in this mode")
    p.add_argument("--report", action="store_true", help="write report.html even if the run had none")
    p.add_argument("--trust-pickled", action="store_true",
                   help="allow loading a fully pickled nn.Module (runs code from the file)")
    p.add_argument("--trust-bundle", action="store_true",
                   help="allow the run's MONAI bundle config to run (its $ expressions and _target_ objects)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("schema", help="print the config's JSON schema")
    p.set_defaults(func=cmd_schema)
    for name, p in sub.choices.items():  # -v after the command too; errors name the command's own flags
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="log progress to the console")
        p.set_defaults(flag_names=frozenset(p._option_string_actions) if name in _FLAG_COMMANDS else frozenset())
    return parser


_LIBRARIES = r"(monai|nnunetv2|captum|dynamic_network_architectures|batchgenerators|acvl_utils)(\.|$)"

_FLAG_COMMANDS = ("explain", "predict", "layers")
"""Commands built from flags, not a config: their errors name flags where a config key has one."""

_FLAGS = {"model.class_path": "--class-path", "model.kwargs": "--kwargs", "model.format": "--format",
          "model.output": "--output", "model.device": "--device", "model.nnunet": "--nnunet",
          "model.bundle": "--bundle", "model.config": "--bundle-config", "model.configuration": "--configuration",
          "model.folds": "--folds", "model.checkpoint": "--checkpoint", "model.path": "--model",
          "output.dir": "--out", "preprocess.in_channels": "--in-channels", "preprocess.spatial_dims": "--spatial-dims",
          "preprocess.axis_order": "--axis-order", "preprocess.normalisation": "--normalisation",
          "preprocess.orientation": "--orientation", "target.classes": "--classes", "target.kind": "--target",
          "target.roi_mask": "--roi-mask", "target.voxel": "--voxel", "target.layer": "--target-layer",
          "target.channel": "--channel", "target.activation": "--activation",
          "target.ground_truth": "--ground-truth", "target.outcome": "--outcome", "execution.patch_size": "--patch-size",
          "execution.overlap": "--overlap", "execution.precision": "--precision", "run.timeout_s": "--timeout",
          "run.seed": "--seed"}


def in_flags(text: str, flags: frozenset[str]) -> str:
    """``text`` with each config key the command has a flag for said as that flag (``model.folds`` -> ``--folds``)."""
    for key, flag in _FLAGS.items():
        if flag in flags and key in text:
            text = re.sub(rf"(?<![\w.]){re.escape(flag)} / {re.escape(key)}\b", flag, text)
            text = re.sub(rf"(?m)^(\s*){re.escape(key)}:", rf"\g<1>{flag}:", text)  # a line per bad value
            text = re.sub(rf"(?<![\w.]){re.escape(key)}(: (?=\S)|\b)",  # "key: value" -> "--flag value"
                          lambda m: flag + (" " if m.group(1) else ""), text)
            text = text.replace(f"{flag} ({flag})", flag)  # "output.dir (--out)" said once
    return text.replace("fix the keys above", "fix the flags above")


def _print_error(exc: EsegetaError, flags: frozenset[str] = frozenset()) -> None:
    """``error: <problem>; fix: <fix>`` on one line (multi-line problems keep their lines), in the
    command's own flags where it has them (``flags``)."""
    text = f"error: {exc.problem}"
    if exc.fix:
        text += ("\n  fix: " if "\n" in exc.problem else "; fix: ") + exc.fix
    print(in_flags(text, flags) if flags else text, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``esegeta``."""
    if argv is None:  # the console command owns its process: one malloc arena for the model thread too
        from esegeta_engine.malloc_arena import share_malloc_arena

        share_malloc_arena()
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    # a library's notice to its own developers (MONAI's changed defaults on a bundle's transforms) is no
    # action for the person running the command: kept off the console
    warnings.filterwarnings("ignore", category=FutureWarning, module=_LIBRARIES)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=_LIBRARIES)
    if argv is None:  # the console command: a job abandoned by the watchdog must not crash the exit
        code = _main(args)
        watchdog = sys.modules.get("esegeta_engine.watchdog")  # not imported: nothing was abandoned
        if watchdog is not None:
            watchdog.exit_process(code)
        return code
    return _main(args)


_LISTINGS = frozenset({"cmd_layers", "cmd_methods", "cmd_schema"})
"""Commands that only list: a reader that stops early (``| head``) took what it wanted."""


def _main(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args) or 0)
    except EsegetaError as exc:
        _print_error(exc, getattr(args, "flag_names", frozenset()))
        return 2
    except BrokenPipeError:  # the reader went away (`esegeta layers ... | head`)
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own flush at exit must not fail
        if getattr(args.func, "__name__", "") in _LISTINGS:  # a listing read as far as wanted: no error
            return 0
        print("stopped: the output pipe closed before the command finished (nothing after that line was done)",
              file=sys.stderr)
        return 1  # a command that does work and did not finish it is no success for a script checking $?
    except OSError as exc:  # a file the command reads or writes outside the engine's own checks
        from esegeta_engine.io import output_error

        _print_error(output_error(exc, exc.filename or "a file"))
        return 2
    except KeyboardInterrupt:
        print("\ncancelled", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
