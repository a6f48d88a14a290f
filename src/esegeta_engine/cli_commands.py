"""The ``esegeta`` commands behind the parser of :mod:`esegeta_engine.cli`.

Each ``cmd_*`` takes the parsed arguments and returns the exit status; heavy modules
(torch, Captum, MONAI, the pipeline) are imported inside the commands, never at import time.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from pathlib import Path
from typing import Any

from esegeta_engine.cli_summary import _print_summary
from esegeta_engine.errors import ConfigError, EsegetaError, OutputError
from esegeta_engine.yamlsafe import load_bounded, read_config_file

log = logging.getLogger("esegeta_engine")

DEMO_METHODS: list[dict[str, Any]] = [
    {"name": "saliency"},
    {"name": "input_x_gradient"},
    {"name": "integrated_gradients", "params": {"n_steps": 16}},
    {"name": "guided_backprop"},
    {"name": "deeplift"},
    {"name": "occlusion", "params": {"window": 16, "perturbations_per_eval": 8}},
    {"name": "feature_ablation", "params": {"n_segments": 48, "perturbations_per_eval": 8}},
    {"name": "layer_gradcam", "layers": ["ups.0.block"]},
]


def _parse_value(text: str) -> Any:
    """A parameter value from the command line, read as bounded YAML (safe, never eval)."""
    try:
        return load_bounded(text, source=f"value {text[:40]!r}")
    except ConfigError as exc:
        if "not valid YAML" in exc.problem:
            return text
        raise


def _method_arg(text: str) -> dict[str, Any]:
    """``name`` or ``name:key=value,key=value`` (``layers=a;b`` for layer methods)."""
    name, _, rest = text.partition(":")
    entry: dict[str, Any] = {"name": name.strip()}
    params: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"--method {text!r}: {item!r} is not key=value",
                              "write e.g. --method occlusion:window=8,stride=4")
        if key == "layers":
            entry["layers"] = [v for v in value.split(";") if v]
        elif key == "smoothgrad":
            entry["noise_tunnel"] = {"samples": int(value)}
        else:
            params[key] = _parse_value(value)
    if params:
        entry["params"] = params
    return entry


def _execute(cfg: Any, quiet: bool, resume: bool = False, trust_pickled: bool = False,
             trust_bundle: bool = False) -> int:
    from tqdm import tqdm

    from esegeta_engine.explain import Progress
    from esegeta_engine.interrupts import cancel_on_signals
    from esegeta_engine.pipeline import iter_run

    cancel = threading.Event()
    # no bar when quiet or when stderr is not a terminal (logs, CI)
    # the bar counts model evaluations against the run's expected total (hence an ETA);
    # it falls back to jobs when some method cannot tell its cost in advance
    bar = tqdm(total=0, unit="eval", disable=True if quiet else None, dynamic_ncols=True, file=sys.stderr)

    def show(event: Progress) -> None:
        if event.run_expected:
            bar.total = max(event.run_expected, event.run_evaluations)
            bar.n = event.run_evaluations
            bar.unit = "eval"
        else:
            bar.total = event.total
            bar.n = event.done
            bar.unit = "job"
        bar.set_description_str(f"[{event.done}/{event.total} jobs] {event.message}"[:70])
        bar.refresh()

    gen = iter_run(cfg, cancel, on_progress=show, resume=resume,
                   trust_pickled=trust_pickled, trust_bundle=trust_bundle)
    # Ctrl-C or SIGTERM (a batch scheduler's stop): the running job stops at its next model
    # evaluation and is recorded as cancelled; a second signal interrupts at once.
    with cancel_on_signals(cancel):
        try:
            while True:
                try:
                    event = next(gen)
                except StopIteration as stop:
                    result = stop.value
                    break
                if isinstance(event, Progress):
                    show(event)
        except KeyboardInterrupt:  # raised inside the running method; iter_run recorded the cancel
            cancel.set()
            gen.close()
            bar.close()
            print(f"\ncancelled; finished maps and the manifest are in {cfg.output.dir}", file=sys.stderr)
            return 130
    bar.close()
    _print_summary(result)
    if result.status == "cancelled":
        print(f"cancelled; finished maps and the manifest are in {cfg.output.dir}", file=sys.stderr)
        return 130
    return 0 if not result.failed else 1


def cmd_run(args: argparse.Namespace) -> int:
    # the one bounded read of the file, before torch is even imported
    data = read_config_file(args.config)

    from esegeta_engine.cohort.config import is_cohort_data
    from esegeta_engine.config import parse_config

    if is_cohort_data(data):
        from esegeta_engine.cohort.cli import cmd_cohort

        return cmd_cohort(args, data)
    cfg = parse_config(data, base=Path(args.config).parent.resolve(), source=Path(args.config).name)
    for flag in ("executor", "scheduler", "workers"):  # a single run is a cohort of one: same executors
        if getattr(args, flag, None):
            setattr(cfg.execution, flag, getattr(args, flag))
    if args.out:
        cfg.output.dir = Path(args.out).resolve()
    if args.overwrite:
        cfg.output.overwrite = True
    if args.device:
        cfg.model.device = args.device
    if args.dry_run:  # the plan and one probed patch; no prediction pass, nothing written
        from esegeta_engine.jobs.dry_run import dry_run

        plan = dry_run(cfg, args.trust_pickled, getattr(args, "trust_bundle", False))
        print("\n".join(plan.lines()))
        print(f"dry run: nothing written (the run would write to {cfg.output.dir})")
        return 0
    return _execute(cfg, args.quiet, getattr(args, "resume", False), trust_pickled=args.trust_pickled,
                    trust_bundle=getattr(args, "trust_bundle", False))


def cmd_explain(args: argparse.Namespace) -> int:
    from esegeta_engine.cli_sources import model_section
    from esegeta_engine.config import parse_config

    data: dict[str, Any] = {
        "model": model_section(args),
        "volumes": args.volume,
        "preprocess": {"spatial_dims": args.spatial_dims, "in_channels": args.in_channels,
                       "normalisation": args.normalisation, "axis_order": args.axis_order,
                       "orientation": args.orientation},
        "execution": {"overlap": args.overlap, "precision": args.precision,
                      "patch_size": (args.patch_size[0] if args.patch_size and len(args.patch_size) == 1
                                     else args.patch_size)},
        "target": {"kind": args.target},
        "methods": [_method_arg(m) for m in args.method],
        "output": {"dir": args.out, "overwrite": args.overwrite},
        "run": {"seed": args.seed, "timeout_s": args.timeout},
    }
    if args.classes:
        data["target"]["classes"] = args.classes
    if args.roi_mask:
        data["target"]["roi_mask"] = args.roi_mask
    if args.voxel:
        data["target"]["voxel"] = args.voxel
    if args.activation:
        data["target"]["activation"] = args.activation
    if args.target_layer:
        data["target"]["layer"] = args.target_layer
    if args.channel is not None:
        data["target"]["channel"] = args.channel
    if getattr(args, "ground_truth", None):
        data["target"]["ground_truth"] = args.ground_truth
    if getattr(args, "outcome", None):
        data["target"]["outcome"] = args.outcome
    return _execute(parse_config(data, base=Path.cwd(), source="command line"), args.quiet, args.resume,
                    trust_pickled=args.trust_pickled, trust_bundle=args.trust_bundle)


def cmd_demo(args: argparse.Namespace) -> int:
    from esegeta_engine.config import parse_config
    from esegeta_engine.sample import sample_info, save_phantom_nifti, unet_paths

    out = Path(args.out).resolve()
    info = sample_info()["models"]["unet3d_vessels"]
    model_path = unet_paths()["state"]
    _check_demo_folder(out, model_path, args.overwrite)
    vol_path, mask_path = save_phantom_nifti(out / "input", seed=args.seed)
    methods = DEMO_METHODS
    if args.methods:
        methods = [_method_arg(m) for m in args.methods.split("+")]
    cfg = parse_config({
        "model": {"path": str(model_path), "class_path": info["class_path"],
                  "kwargs": info["kwargs"]},
        "volumes": [str(vol_path)],
        "preprocess": {"normalisation": "minmax"},
        "target": {"kind": "argmax", "classes": [1]},
        "methods": methods,
        "output": {"dir": str(out), "overwrite": True},
        "run": {"seed": 0},
        "evaluation": {"localisation": {"mask": str(mask_path)}, "report": not args.no_report},
    }, source="demo")
    print(f"demo: phantom TOF-MRA volume {vol_path.name} (ground truth: {mask_path.name}), "
          f"bundled 3D U-Net, argmax target on the vessel class, {len(methods)} methods",
          file=sys.stderr)
    return _execute(cfg, args.quiet)


def _check_demo_folder(out: Path, model_path: Path, overwrite: bool) -> None:
    """Let the demo replace only an earlier demo run in ``out`` (anything else needs ``--overwrite``).

    Raises
    ------
    OutputError
        ``out`` holds another run, or files that are not a demo's.
    """
    if overwrite or not out.exists():
        return
    if not out.is_dir():
        raise OutputError(f"--out {str(out)!r} is a file", "choose a folder for the demo")
    manifest = out / "manifest.json"
    if manifest.is_file():
        try:
            cfg = json.loads(manifest.read_text(encoding="utf-8")).get("config") or {}
            demo = (Path(str(cfg["model"]["path"])) == model_path
                    and all(Path(v).parent == out / "input" for v in cfg["volumes"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            demo = False
        if not demo:
            raise OutputError(f"{str(out)!r} holds another run (manifest.json), not a demo's",
                              "choose another folder for the demo (--out), or pass --overwrite")
    elif any(out.iterdir()):
        raise OutputError(f"{str(out)!r} is not empty and holds no demo run",
                          "choose a new or empty folder for the demo (--out), or pass --overwrite")


def cmd_methods(args: argparse.Namespace) -> int:
    from esegeta_engine.methods import get_method, list_methods

    specs = [get_method(args.name)] if args.name else list_methods(args.family)
    if args.json:
        print(json.dumps([{"name": s.name, "family": s.family, "title": s.title, "summary": s.summary,
                           "needs_layer": s.needs_layer, "needs_hooks": s.needs_hooks,
                           "noise_tunnel": s.noise_tunnel,
                           "params": [{"name": p.name, "kind": p.kind, "default": p.default,
                                       "help": p.help, "allowed": p.describe_range()} for p in s.params]}
                          for s in specs], indent=2))
        return 0
    family = None
    for s in specs:
        if s.family != family:
            family = s.family
            print(f"\n[{family}]")
        flags = [f for f, on in (("needs layer", s.needs_layer), ("smoothgrad", s.noise_tunnel),
                                 ("not TorchScript", s.needs_hooks), ("needs batch", s.needs_batch)) if on]
        print(f"  {s.name:<28} {s.summary}" + (f"  [{', '.join(flags)}]" if flags else ""))
        if args.name or args.verbose:
            for p in s.params:
                print(f"      {p.name:<24} default {p.default!r:<10} {p.help}; {p.describe_range()}")
    if not args.name and not args.verbose:
        print("\n`esegeta methods NAME` shows a method's parameters.")
    return 0


def cmd_layers(args: argparse.Namespace) -> int:
    from esegeta_engine.cli_sources import model_config_from_args
    from esegeta_engine.models import Trust, list_layers, load_source

    try:
        model = load_source(model_config_from_args(args),
                            Trust(pickled=args.trust_pickled, bundle=args.trust_bundle)).module
    except EsegetaError as exc:  # the engine names config keys; this command takes flags
        if args.class_path is None and "class_path" in (exc.fix or ""):
            exc.fix = "give --class-path (e.g. mypackage.nets:UNet) and --kwargs '{...}'"
        raise
    layers = list_layers(model)
    width = max((len(name) for name, _ in layers), default=0) + 2
    for name, kind in layers:
        print(f"{name:<{width}}{kind}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from esegeta_engine.sample import save_phantom_nifti

    vol, mask = save_phantom_nifti(Path(args.out), seed=args.seed)
    print(f"wrote {vol} and {mask}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from esegeta_engine.evaluation.report import build_report_from_run

    path = build_report_from_run(Path(args.run_dir), mask=args.mask)
    print(f"wrote {path} (open it in a browser; metrics.csv and metrics.json beside it)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from esegeta_engine.evaluation.rerun import iter_evaluate_run
    from esegeta_engine.evaluation.session import MapScored
    from esegeta_engine.interrupts import cancel_on_signals

    cancel = threading.Event()
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    gen = iter_evaluate_run(args.run_dir, metrics=metrics, mask=args.mask, randomisation=args.randomisation,
                            report=True if args.report else None, trust_pickled=args.trust_pickled,
                            trust_bundle=args.trust_bundle, cancel=cancel)
    scored = 0
    with cancel_on_signals(cancel):
        while True:
            try:
                event = next(gen)
            except StopIteration as stop:
                manifest = stop.value
                break
            if isinstance(event, MapScored):
                scored += 1
                if not args.quiet:
                    print(f"scored map {scored}", file=sys.stderr)
    print(f"{scored} map(s) re-evaluated; records updated in {Path(args.run_dir) / 'manifest.json'}"
          + (f"; report {manifest['report']}" if manifest.get("report") else ""))
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from esegeta_engine.config import Config

    print(json.dumps(Config.model_json_schema(), indent=2))
    return 0
