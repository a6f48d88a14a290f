"""What ``esegeta run`` / ``explain`` / ``demo`` print when a run ends: one row per map, the totals,
the randomisation verdicts, each map's trust scorecard and completeness warnings (read as
:class:`~esegeta_engine.jobs.record.MapRecord` s)."""

from __future__ import annotations

import json
from typing import Any

SUMMARY_METRICS = ("completeness_error", "class_contrast_spearman",
                   "infidelity", "sensitivity", "auc_deletion", "auc_insertion", "mass_inside", "roc_auc")


def _fmt(v: Any) -> str:
    if v is None:
        return "undef"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _print_randomisation(manifest_path: Any) -> None:
    """The randomisation verdict and its reason for every method (from the manifest)."""
    try:
        entries = json.loads(manifest_path.read_text(encoding="utf-8")).get("randomisation") or []
    except (OSError, ValueError):
        return
    for entry in entries:
        print(f"\nrandomisation ({entry.get('mode')}) · {entry.get('target')} · {entry.get('volume')}:")
        for method, v in (entry.get("verdicts") or {}).items():
            print(f"  {method}: {v.get('verdict')} — {v.get('reason')}")


def _print_trust(manifest_path: Any) -> None:
    """Each map's trust scorecard in one line (from the manifest, randomisation included)."""
    from esegeta_engine.jobs.record import MapRecord

    try:
        records = [MapRecord.from_json(r) for r in
                   json.loads(manifest_path.read_text(encoding="utf-8")).get("results") or []]
    except (OSError, ValueError):
        return
    lines = [f"  {r.file}: {r.extra['trust']['line']}" for r in records if (r.extra.get("trust") or {}).get("line")]
    if lines:
        print("\ntrust (ok: checked and passed, FAILED, -: not checked):")
        print("\n".join(lines))


def _label(r: Any) -> str:
    """``method[@layer]`` of a :class:`~esegeta_engine.jobs.record.MapRecord`."""
    return r.method + (f"@{r.layer}" if r.layer else "")


def _print_summary(result: Any) -> None:
    records = result.maps
    metrics = [k for k in SUMMARY_METRICS if any(k in (r.metrics or {}) for r in records)]
    rows = [("method", "target", "volume", "status", "time s", "calls", "inputs", *metrics, "output")]
    for r in records:
        out = r.file or (r.error or "").splitlines()[0][:60]
        m = r.metrics or {}
        rows.append((_label(r), r.target, str(r.volume), r.status, f"{r.seconds:.2f}",
                     str(r.model_evaluations), "" if r.model_inputs is None else str(r.model_inputs),
                     *[_fmt(m.get(k)) if k in m else "" for k in metrics], out))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for k, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if k == 0:
            print("  ".join("-" * w for w in widths))
    ok = sum(r.ok for r in records)
    print(f"\n{ok} of {len(records)} maps written to {result.out_dir} "
          f"(run {result.status}); manifest: {result.manifest_path.name}")
    if (result.out_dir / "report.html").is_file():
        print(f"report: {result.out_dir / 'report.html'}")
    from esegeta_engine.evaluation.costs import evaluations_line

    print(evaluations_line(result.manifest_path) or "", end="")
    _print_randomisation(result.manifest_path)
    _print_trust(result.manifest_path)
    for r in records:
        if (r.metrics or {}).get("axiom_status") == "warning":
            print(f"warning: {_label(r)} · {r.target} · {r.volume}: {(r.metrics or {}).get('axiom_note', '')}")
    print(_legend(metrics))


def _legend(metrics: list[str]) -> str:
    """What the table's columns mean: only those it shows."""
    parts = ["calls/inputs: model forward calls and inputs evaluated"]
    if "completeness_error" in metrics:
        parts.insert(0, "completeness_error: |sum(map) - (F(x) - F(baseline))| / |F(x) - F(baseline)| (undef: no axiom)")
    lower = [k for k in ("infidelity", "sensitivity", "auc_deletion") if k in metrics]
    if lower:
        parts.append(f"{', '.join(lower)} lower is better")
    if "class_contrast_spearman" in metrics:
        parts.append("class_contrast_spearman: |Spearman| of the map and another class's (lower: the map tells the "
                     "classes apart)")
    higher = [k for k in ("auc_insertion", "mass_inside", "roc_auc") if k in metrics]
    if higher:
        truth = " (vs the ground truth)" if {"mass_inside", "roc_auc"} & set(higher) else ""
        parts.append(f"{', '.join(higher)}{truth} higher is better")
    return "; ".join(parts)
