"""A self-contained HTML report of a run folder, with its numbers as CSV/JSON, and a PDF.

:func:`write_report` writes ``report.html`` (inline CSS and JS; figures, metrics.csv,
metrics.json and manifest.json embedded as ``data:`` URIs, so the file alone can be mailed
and opens with its pictures), ``report.pdf`` (the same summary, tables and figures, for
meetings), ``metrics.csv`` and ``metrics.json``. The page opens with a summary in words of
how far to trust each map (:mod:`.trust`). :func:`build_report_from_run` (``esegeta
report RUN_DIR``) draws the figures of the maps in ``manifest.json`` first.
The page is XHTML-style markup (every tag closed, script in CDATA): it parses
as HTML and as XML.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from esegeta_engine import __version__
from esegeta_engine.errors import ConfigError, EsegetaError, VolumeError
from esegeta_engine.evaluation.report_html import (  # noqa: F401 (TEXT_COLUMNS, UNDEFINED, _cell re-exported)
    CSS,
    JS,
    TEXT_COLUMNS,
    UNDEFINED,
    _cell,
    _e,
    _kv_table,
    _plain,
    _table,
)
from esegeta_engine.io import write_json, write_text
from esegeta_engine.jobs.record import MapRecord
from esegeta_engine.tables import csv_text

__all__ = ["build_report_from_run", "data_uri", "write_report"]
log = logging.getLogger("esegeta_engine")

MANIFEST = "manifest.json"

BASE_COLUMNS = ("volume", "method", "layer", "target", "status", "seconds", "model_evaluations")
RECORD_KEYS = BASE_COLUMNS + ("class", "noise_tunnel", "file", "error", "params")

def _records(manifest: Mapping[str, Any]) -> list[MapRecord]:
    """The manifest's results as records (an entry that is not one is logged and left out)."""
    out = []
    for i, entry in enumerate(manifest.get("results") or []):
        try:
            out.append(MapRecord.from_json(entry))
        except ValueError as exc:
            log.warning("manifest result %d is left out of the report: %s", i, exc)
    return out


def _row(rec: MapRecord) -> dict[str, Any]:
    """The table row of one record: its fields, scalar metrics and map statistics (``map_*``)."""
    data = rec.to_json()
    return {**{k: data[k] for k in RECORD_KEYS if k in data},
            **{k: v for k, v in (rec.metrics or {}).items() if not isinstance(v, (dict, list))},
            **{f"map_{k}": v for k, v in (rec.stats or {}).items()}}


def _merge(records: Sequence[MapRecord], metrics: Sequence[Mapping[str, Any]]) -> list[dict]:
    """One row per record, with the metric rows that match it (by file, else by key) merged in."""
    rows = [_row(r) for r in records]
    for m in metrics:
        if m.get("file"):
            found = [r for r in rows if r.get("file") == m["file"]]
        else:
            keys = [k for k in ("volume", "method", "layer", "target") if k in m]
            found = [r for r in rows if "method" in keys and all(str(r.get(k)) == str(m[k]) for k in keys)]
        if len(found) != 1:
            rows.append(dict(m))
        else:  # the record's own fields win over the metric row's
            found[0].update({k: v for k, v in m.items() if k not in RECORD_KEYS or found[0].get(k) is None})
    return rows


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    cols = dict.fromkeys(k for r in rows for k in r)
    return [c for c in RECORD_KEYS if c in cols] + [c for c in cols if c not in RECORD_KEYS]


def _write_numbers(run_dir: Path, rows: list[dict], columns: list[str]) -> None:
    plain = [{c: _plain(r.get(c)) for c in columns if c in r} for r in rows]
    write_json({"columns": columns, "rows": plain}, run_dir / "metrics.json")
    cells = (["" if r.get(c) is None else json.dumps(r[c]) if isinstance(r[c], (dict, list))
              else r[c] for c in columns] for r in plain)
    _write_text(run_dir / "metrics.csv", csv_text(columns, cells, lineterminator="\n"))  # formulas escaped


def _write_text(path: Path, text: str) -> None:
    """Write ``text`` atomically (see :func:`esegeta_engine.io.atomic_write`)."""
    write_text(text, path)


def _summary(manifest: Mapping[str, Any], records: Sequence[MapRecord]) -> str:
    cfg = manifest.get("config") or {}
    model, target = cfg.get("model") or {}, cfg.get("target") or {}
    n_ok = sum(r.ok for r in records)
    items = {
        "status": manifest.get("status"), "created": manifest.get("created"),
        "duration (s)": manifest.get("duration_s"),
        "method time (s)": round(sum(float(r.seconds or 0) for r in records), 3),
        "model": " ".join(str(x) for x in (model.get("path"), model.get("class_path")) if x) or None,
        "target": ", ".join(f"{k}={v}" for k, v in target.items() if v not in (None, [], {})) or None,
        "device": manifest.get("device"), "seed": manifest.get("seed"),
        "results": f"{n_ok} ok, {len(records) - n_ok} not ok, {len(records)} in all",
    }
    items.update({"error": manifest["error"]} if manifest.get("error") else {})
    vols = [{"path": v.get("path"), "shape": " × ".join(map(str, v.get("shape") or [])),
             "spacing_mm": ", ".join(f"{s:.3g}" for s in v.get("spacing_mm") or []),
             "prediction": v.get("prediction")} for v in manifest.get("volumes") or []]
    out = ["<h2>Run</h2>", _kv_table(items), "<h3>Volumes</h3>",
           _table(vols, ["path", "shape", "spacing_mm", "prediction"]) if vols else "<p>none</p>"]
    if manifest.get("environment"):
        out += ["<h3>Versions</h3>", _kv_table(manifest["environment"])]
    return "\n".join(out)


def data_uri(path: Path, mime: str) -> str:
    """The file's bytes as a ``data:`` URI (the report carries its figures and numbers)."""
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _figures_html(run_dir: Path, figures: Mapping[str, Sequence[str | Path]]) -> str:
    out = ["<h2>Figures</h2>"]
    for section, paths in figures.items():
        out.append(f'<details open="open"><summary>{_e(section)} ({len(paths)})</summary><div class="figs">')
        for p in paths:
            full = Path(p) if Path(p).is_absolute() else run_dir / p
            rel = Path(os.path.relpath(full, run_dir)).as_posix()
            if not full.is_file():
                out.append(f'<p class="note">figure {_e(rel)} is missing</p>')
                continue
            out.append(f'<figure><img src="{data_uri(full, "image/png")}" alt="{_e(rel)}"/>'
                       f"<figcaption>{_e(rel)}</figcaption></figure>")
        out.append("</div></details>")
    return "\n".join(out)


def _trust_html(summaries: Sequence[Mapping[str, Any]]) -> str:
    if not summaries:
        return ""
    items = "".join(f'<li><b>{_e(s["method"])}</b> · {_e(s["target"])} · {_e(s["volume"])}: '
                    f'<span class="trust-{_e(s["trust"])}">trust {_e(s["trust"])}</span>. {_e(s["words"])}</li>'
                    for s in summaries)
    return ("<h2>How far to trust each map</h2><p>Low: a broken completeness axiom or a failed "
            "randomisation check; high: passes the randomisation check with no broken axiom.</p>"
            f"<ul>{items}</ul>")


def _read_manifest(run_dir: Path) -> dict[str, Any]:
    path = run_dir / MANIFEST
    if not path.is_file():
        raise ConfigError(f"{str(run_dir)!r} has no {MANIFEST}", "give the output folder of an `esegeta run`")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} cannot be read ({exc})", "the run folder is damaged; run it again") from None


def write_report(
    run_dir: str | Path,
    *,
    metrics: Sequence[Mapping[str, Any]] | None = None,
    figures: Mapping[str, Sequence[str | Path]] | None = None,
    extra_tables: Mapping[str, Any] | None = None,
    notes: Sequence[str] | None = None,
) -> Path:
    """Write ``report.html``, ``metrics.csv`` and ``metrics.json`` into ``run_dir``.

    Parameters
    ----------
    run_dir : str or Path
        The run folder; its ``manifest.json`` gives the summary and one table
        row per result record (without one, the report shows ``metrics`` alone).
    metrics : list of dict, optional
        Metric rows (e.g. ``{"file": ..., "roc_auc": 0.9}``), merged into the
        record with the same ``file``, else the one with the same
        volume/method/layer/target; unmatched rows get rows of their own.
        Scalar values become table columns; NaN and None show as "undefined".
    figures : dict, optional
        Section title -> PNG paths (absolute or relative to ``run_dir``).
    extra_tables : dict, optional
        Title -> list of row dicts (a table) or a dict (a key/value table).
    notes : list of str, optional
        Warnings shown at the top (e.g. a volume that could not be read).

    Returns
    -------
    Path
        ``run_dir / "report.html"``. ``metrics.json`` holds ``{"columns",
        "rows"}`` (NaN as null), ``metrics.csv`` the same (NaN as empty).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest = _read_manifest(run_dir) if (run_dir / MANIFEST).is_file() else {}
    records = _records(manifest)
    rows = _merge(records, list(metrics or []))
    columns = _columns(rows)
    _write_numbers(run_dir, rows, columns)
    shown = [c for c in BASE_COLUMNS if c != "volume" or len({r.get("volume") for r in rows}) > 1]
    shown += [c for c in columns if c not in RECORD_KEYS and not c.startswith("map_")
              and all(not isinstance(r.get(c), (dict, list, tuple)) for r in rows)]
    title = f"napari-esegeta report · {run_dir.resolve().name}"
    from esegeta_engine.evaluation.trust import method_summaries, randomisation_tables, scorecard_html

    links = [f'<a href="{data_uri(run_dir / name, mime)}" download="{name}">{name}</a>'
             for name, mime in (("metrics.csv", "text/csv"), ("metrics.json", "application/json"),
                                (MANIFEST, "application/json")) if (run_dir / name).is_file()]
    parts = [f"<h1>{_e(title)}</h1>", "<p>Every number (embedded, downloads): " + " · ".join(links) + "</p>"]
    parts += [f'<p class="note">{_e(n)}</p>' for n in notes or []]
    summaries = method_summaries(records, manifest.get("randomisation"))
    parts.append(_trust_html(summaries))
    parts.append(scorecard_html(records))  # per map: checked / not checked / failed, with the number
    parts.append(_summary(manifest, records) if manifest else '<p class="note">no manifest.json here</p>')
    parts += ["<h2>Metrics</h2>", "<p>One row per result; click a column header to sort.</p>",
              _table(rows, shown, sortable=True, row_class="status")]
    failed = [r for r in rows if r.get("error")]
    if failed:
        parts.append("<h3>Failures</h3><ul>" + "".join(
            f"<li><b>{_e(r.get('method'))}</b> · {_e(r.get('target'))}: <code>{_e(r['error'])}</code></li>"
            for r in failed) + "</ul>")
    verdict_rows, stage_rows = randomisation_tables(manifest.get("randomisation"))
    tables: dict[str, Any] = {}
    if verdict_rows:
        tables["Randomisation verdicts"] = verdict_rows
        tables["Randomisation stages (similarity to the trained map, null, margin)"] = stage_rows
    tables.update(extra_tables or {})
    if figures:
        parts.append(_figures_html(run_dir, figures))
    for name, table in tables.items():
        parts += [f"<h2>{_e(name)}</h2>", _kv_table(table) if isinstance(table, Mapping)
                  else _table(table, _columns(table), sortable=True)]
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    parts.append(f"<footer><p>Generated {_e(stamp)} by napari-esegeta {_e(__version__)}.</p></footer>")
    page = ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"/>'
            f"<title>{_e(title)}</title><style>{CSS}</style></head>\n<body>\n" + "\n".join(parts)
            + f"\n<script>//<![CDATA[\n{JS}\n//]]></script>\n</body></html>\n")
    _write_text(run_dir / "report.html", page)
    try:
        from esegeta_engine.evaluation.report_pdf import write_pdf

        write_pdf(run_dir / "report.pdf", title, summaries, {"Metrics": (rows, shown), **{
            k: (v, _columns(v)) for k, v in tables.items() if not isinstance(v, Mapping)}},
            [Path(p) if Path(p).is_absolute() else run_dir / p for ps in (figures or {}).values() for p in ps])
    except EsegetaError as exc:  # no matplotlib: the HTML report still stands
        log.warning("no PDF report: %s", exc)
    return run_dir / "report.html"


def _load(path: Path, ndim: int) -> np.ndarray:
    """A NIfTI array with trailing singleton axes beyond ``ndim`` dropped.

    Raises
    ------
    VolumeError
        The file is missing, truncated or not NIfTI.
    """
    try:
        data = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel, zlib and numpy each raise their own
        raise VolumeError(f"{path.name} cannot be read ({type(exc).__name__}: {str(exc)[:200]}); it is "
                          "truncated or corrupt", "rerun the run that wrote it (or export the file "
                          "again)") from None
    while data.ndim > ndim and data.shape[-1] == 1:
        data = data[..., 0]
    return data


def _stem(path: str, index: int) -> str:
    """Volume stem for manifests written before they recorded ``stem``."""
    name = re.sub(r"\.nii(\.gz)?$", "", Path(path).name)
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", name).strip("-") or f"volume{index}"


def build_report_from_run(run_dir: str | Path, *, mask: str | Path | None = None) -> Path:
    """Draw the figures of a run folder and write its report (``esegeta report``).

    Reads ``manifest.json``, each map and its input volume; writes one MIP
    figure per map and one comparison grid per volume and target under
    ``run_dir/figures/``; merges the rows of an existing ``metrics.json``;
    with ``mask`` (a NIfTI ground truth on the volumes' grid) adds the
    localisation scores of every map. Returns the path of ``report.html``.

    Raises
    ------
    ConfigError
        No readable ``manifest.json`` in ``run_dir``.
    VolumeError
        The mask does not have the maps' shape.
    """
    from esegeta_engine.evaluation.figures import comparison_grid, curves_figure, mip_figure, montage_figure
    from esegeta_engine.evaluation.figures_stability import report_stability
    from esegeta_engine.evaluation.localisation import localisation_scores

    run_dir = Path(run_dir)
    manifest = _read_manifest(run_dir)
    ndim = int(((manifest.get("config") or {}).get("preprocess") or {}).get("spatial_dims") or 3)
    vols = manifest.get("volumes") or []
    stems = [v.get("stem") or _stem(v.get("path") or "", i) for i, v in enumerate(vols)]
    gt = None if mask is None else _load(Path(mask), ndim) != 0
    notes: list[str] = []
    if gt is not None and vols and not np.allclose(nib.load(str(mask)).affine, vols[0].get("affine", np.eye(4)),
                                                   atol=1e-3):
        notes.append(f"the mask {Path(mask).name} and the volume have different affines: is it on the same grid?")
    metrics: dict[str, dict[str, Any]] = {}
    if (run_dir / "metrics.json").is_file():
        old = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
        for i, row in enumerate(old.get("rows", []) if isinstance(old, dict) else old):
            metrics[str(row.get("file") or i)] = dict(row)
    groups: dict[tuple[str, str], list[MapRecord]] = {}
    for rec in _records(manifest):
        if rec.ok and rec.file:
            groups.setdefault((str(rec.volume), str(rec.target)), []).append(rec)
    figures: dict[str, list[Path]] = {}
    stability_rows: list[dict[str, Any]] = []
    fig_dir = run_dir / "figures"
    for (stem, target), recs in groups.items():
        idx = [i for i, s in enumerate(stems) if stem in (s, f"{i:02d}-{s}")] or ([0] if len(vols) == 1 else [])
        entry = vols[idx[0]] if idx else {}
        volume, spacing, path = None, entry.get("spacing_mm"), Path(entry.get("path") or "?")
        affine = entry.get("affine")
        try:
            volume = _load(path if path.is_absolute() else run_dir / path, len(entry.get("shape") or [ndim]))
        except Exception as exc:  # a missing or unreadable volume must not stop the report
            notes.append(f"volume {path} could not be read ({type(exc).__name__}); maps are drawn on black")
        maps: dict[str, np.ndarray] = {}
        for rec in recs:
            if not (run_dir / rec.file).is_file():
                notes.append(f"map {rec.file} is listed in the manifest but missing")
                continue
            try:
                arr = _load(run_dir / rec.file, ndim)
            except VolumeError as exc:  # one damaged map must not lose the rest of the report
                notes.append(f"map {exc.problem}; it is left out")
                log.warning("%s: left out of the report; fix: %s", exc.problem, exc.fix)
                continue
            # <volume>__<method[@layer]>__<target>.nii.gz -> the method label (unique per map)
            label = re.sub(r"\.nii(\.gz)?$", "", rec.file).removeprefix(f"{stem}__").rsplit("__", 1)[0]
            label = label if label not in maps else f"{label} ({len(maps) + 1})"
            maps[label] = arr
            if gt is not None:  # (a stale note of an earlier build goes; a new one replaces it)
                row = metrics.setdefault(rec.file, {"file": rec.file})
                row.pop("note", None)
                row.update(localisation_scores(arr.reshape(*arr.shape[:ndim], -1).sum(-1), gt))
            png = fig_dir / (rec.file.removesuffix(".gz").removesuffix(".nii") + "__mip.png")
            figures.setdefault(f"Maps · {stem} · {target}", []).append(
                mip_figure(volume, arr, png, title=f"{label} · {target} · {stem}", spacing=spacing,
                           affine=affine))
            spread = report_stability(run_dir, rec, volume, arr, ndim, fig_dir, f"{label} · {target} · {stem}",
                                      spacing, affine, notes)
            if spread is not None:  # the spread beside the map, and the numbers in a table
                figures.setdefault(f"Stability · {stem} · {target}", []).append(spread[0])
                stability_rows.append(spread[1])
            if ndim == 3 and volume is not None and arr.ndim == 3:
                figures.setdefault(f"Slice montages · {stem} · {target}", []).append(montage_figure(
                    volume, arr, fig_dir / png.name.replace("__mip.png", "__montage.png"),
                    title=f"{label} · {target} · {stem}", spacing=spacing, affine=affine))
        if maps:
            figures.setdefault("Comparison of methods", []).append(comparison_grid(
                volume, maps, fig_dir / f"{stem}__{_stem(target, 0)}__comparison.png",
                title=f"{stem} · {target}", spacing=spacing, affine=affine))
    curves_path = run_dir / "curves.json"
    if curves_path.is_file():  # faithfulness curves written by the run, one figure per volume/target
        curves = json.loads(curves_path.read_text(encoding="utf-8"))
        for (stem, target), recs in groups.items():
            chosen = {r.file.removesuffix(".nii.gz").removeprefix(f"{stem}__").rsplit("__", 1)[0]: curves[r.file]
                      for r in recs if r.file in curves}
            if chosen:
                figures.setdefault("Faithfulness curves", []).append(curves_figure(
                    chosen, fig_dir / f"{stem}__{_stem(target, 0)}__curves.png", title=f"{stem} · {target}"))
    for entry in manifest.get("randomisation") or []:
        if entry.get("figure") and (run_dir / entry["figure"]).is_file():
            figures.setdefault("Randomisation sanity check", []).append(run_dir / entry["figure"])
    figures = dict(sorted(figures.items(), key=lambda kv: not kv[0].startswith("Comparison")))
    tables = {"Stability: each map's spread over members or noisy inputs": stability_rows} if stability_rows else None
    return write_report(run_dir, metrics=list(metrics.values()), figures=figures, notes=notes, extra_tables=tables)

