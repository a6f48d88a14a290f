"""How far to trust each map, in words and in tables, from a run's manifest.

Used by the HTML and PDF reports: :func:`method_summaries` gives one sentence-level
summary per (volume, method, target) from the completeness check, the randomisation
verdict (with its margin over the null), faithfulness and localisation;
:func:`randomisation_tables` flattens the randomisation results into a verdict table and a
per-stage table (similarities, null, margin).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from esegeta_engine.jobs.record import MapRecord

__all__ = ["SCORECARD", "method_summaries", "randomisation_tables", "scorecard", "scorecard_line", "verdicts_for"]


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _as_record(rec: MapRecord | Mapping[str, Any]) -> MapRecord:
    """A manifest entry as a :class:`MapRecord` (records pass through)."""
    return rec if isinstance(rec, MapRecord) else MapRecord.from_json(dict(rec))


def _label(rec: MapRecord | Mapping[str, Any]) -> str:
    rec = _as_record(rec)
    return rec.method + (f"@{rec.layer}" if rec.layer else "")


def _axiom_words(m: Mapping[str, Any]) -> tuple[str, int]:
    """Words on the completeness check and a trust score (-1 bad, 0 unknown, 1 good)."""
    status, err = m.get("axiom_status"), _num(m.get("completeness_error"))
    if status == "ok" and err is not None:
        return f"sums to F(x) - F(baseline) within {100 * err:.2g}% (completeness holds)", 1
    if status == "warning":
        return f"misses completeness: {m.get('axiom_note', '')}", -1
    if status == "undefined":
        return f"completeness undefined ({m.get('axiom_note', '')})", 0
    note = m.get("axiom_note")
    return "no completeness axiom for this method" + (f"; {note}" if note else ""), 0


def _randomisation_words(verdicts: Sequence[tuple[str, Mapping[str, Any]]]) -> tuple[str, int]:
    if not verdicts:
        return "randomisation check not run", 0
    parts, score = [], 0
    for mode, v in verdicts:
        parts.append(f"{mode} randomisation: {v.get('reason') or v.get('verdict')}")
        if v.get("passes") is True:
            score = max(score, 1) if score >= 0 else score
        elif v.get("passes") is False:
            score = -1
    return "; ".join(parts), score


def method_summaries(records: Sequence[MapRecord | Mapping[str, Any]],
                     randomisation: Sequence[Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One summary per successful map: ``volume``, ``method``, ``target``, ``trust`` (low,
    moderate, high or unchecked) and ``words`` (one paragraph), plus the key numbers."""
    verdicts: dict[tuple[str, str, str], list[tuple[str, Mapping[str, Any]]]] = {}
    for entry in randomisation or []:
        for method, v in (entry.get("verdicts") or {}).items():
            verdicts.setdefault((str(entry.get("volume")), method, str(entry.get("target"))), []).append(
                (str(entry.get("mode")), v))
    out = []
    for rec in map(_as_record, records):
        if not rec.ok:
            continue
        m = rec.metrics or {}
        label = _label(rec)
        axiom, a_score = _axiom_words(m)
        rnd, r_score = _randomisation_words(verdicts.get((str(rec.volume), label, str(rec.target)), []))
        words = [f"Axiom: {axiom}.", f"Sanity: {rnd}."]
        dele, ins = _num(m.get("auc_deletion")), _num(m.get("auc_insertion"))
        if dele is not None or ins is not None:
            words.append("Faithfulness: deletion AUC " + (f"{dele:.3g}" if dele is not None else "undefined")
                         + " (lower is better), insertion AUC " + (f"{ins:.3g}" if ins is not None else "undefined")
                         + " (higher is better).")
        if m.get("class_contrast_status") == "flagged":
            words.append(f"Class contrast: {m.get('class_contrast_note')}.")
            a_score = -1
        elif m.get("class_contrast_status") == "ok":
            words.append(f"Class contrast: the map changes with the class (|Spearman| "
                         f"{abs(_num(m.get('class_contrast_spearman')) or 0):.2f} against class "
                         f"{m.get('class_contrast_class')}).")
        auc, iou = _num(m.get("roc_auc")), _num(m.get("iou_otsu"))
        if "roc_auc" in m:
            words.append("Localisation: " + (f"ROC AUC {auc:.3g} against the ground truth" if auc is not None
                                             else "undefined" + (f" ({m['note']})" if m.get("note") else ""))
                         + (f", IoU of the Otsu-thresholded map {iou:.3g}" if iou is not None else "") + ".")
        if a_score < 0 or r_score < 0:
            trust = "low"  # a broken axiom, a failed sanity check or a map blind to the class
        elif r_score > 0:
            trust = "high"  # passes the sanity check and no axiom is broken
        elif a_score > 0:
            trust = "moderate"  # the axiom holds; the sanity check was not run or gave no verdict
        else:
            trust = "unchecked"
        out.append({"volume": rec.volume, "method": label, "target": rec.target, "trust": trust,
                    "words": " ".join(words), "completeness_error": _num(m.get("completeness_error")),
                    "randomisation": "; ".join(f"{mode}: {v.get('verdict')}" for mode, v in
                                               verdicts.get((str(rec.volume), label, str(rec.target)), [])) or None})
    return out


def randomisation_tables(randomisation: Sequence[Mapping[str, Any]] | None) -> tuple[list[dict], list[dict]]:
    """(verdict rows, stage rows) of a manifest's ``randomisation`` entries.

    Verdict rows: volume, target, mode, method, verdict, mean similarity, null, margin,
    measure, reason. Stage rows: volume, target, mode, method, stage, layer, spearman_abs,
    spearman_footprint, ssim, topk_iou, null, margin.
    """
    verdict_rows, stage_rows = [], []
    for entry in randomisation or []:
        base = {"volume": entry.get("volume"), "target": entry.get("target"), "mode": entry.get("mode")}
        for method, v in (entry.get("verdicts") or {}).items():
            verdict_rows.append({**base, "method": method, "verdict": v.get("verdict"),
                                 "mean_similarity": v.get("mean_similarity"), "null": v.get("null"),
                                 "margin": v.get("margin"), "measure": v.get("measure"), "reason": v.get("reason")})
        stages = entry.get("stages") or []
        for method, per_stage in (entry.get("scores") or {}).items():
            for k, layer in enumerate(stages, start=1):
                s = per_stage.get(layer)
                if s is None:
                    stage_rows.append({**base, "method": method, "stage": k, "layer": layer,
                                       "note": "undefined: this stage failed (see errors)"})
                    continue
                stage_rows.append({**base, "method": method, "stage": k, "layer": layer,
                                   **{key: s.get(key) for key in ("spearman_abs", "spearman_footprint", "ssim",
                                                                  "topk_iou", "null", "margin")}})
    return verdict_rows, stage_rows


# -- the per-map scorecard ------------------------------------------------------------------------

#: The scorecard's checks, in the order of its one-line summary.
SCORECARD = ("axiom", "randomisation", "faithfulness", "localisation", "stability")
#: Stability fails below this mean pairwise rank correlation of the members' (or noisy) maps.
STABILITY_MIN_SPEARMAN = 0.5


def _entry(status: str, value: float | None = None, what: str = "", note: str = "", **more: Any) -> dict[str, Any]:
    return {"status": status, "value": value, "what": what, **({"note": note} if note else {}), **more}


#: The evaluators behind each check: their ``<name>_error`` says why a check could not run.
_ERRORS = {"axiom": ("axioms_error",), "randomisation": ("mprt_error",),
           "faithfulness": ("road_error", "faithfulness_error", "region_perturbation_error"),
           "localisation": ("localisation_error",), "stability": ("stability_error",)}


def _text(e: Mapping[str, Any]) -> str:
    """A check's number as shown: ``0.91`` (and ``(null 0.2)`` for a calibrated randomisation verdict)."""
    text = f" {_fmt(e.get('value'))}" if e.get("value") is not None else ""
    return text + (f" (null {_fmt(e.get('null'))})" if e.get("null") is not None else "")


def scorecard(metrics: Mapping[str, Any], verdicts: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """What was verified about one map: each check "checked", "not checked" or "failed", with its number.

    Parameters
    ----------
    metrics : mapping
        The map's record metrics (axiom, ROAD / deletion, localisation, MPRT, stability keys).
    verdicts : sequence of mapping
        Randomisation verdicts of this map's method and target (``passes``, ``mean_similarity``,
        ``null``, ``margin``, ``mode``).

    Returns
    -------
    dict
        ``{check: {"status", "value", "what"[, "note"]}}`` for every check in :data:`SCORECARD`,
        plus ``line``: the one-line summary a reviewer reads.
    """
    m = metrics
    card: dict[str, Any] = {}
    err, status = _num(m.get("completeness_error")), m.get("axiom_status")
    if status == "ok":
        card["axiom"] = _entry("checked", err, "completeness error (relative)")
    elif status == "warning":
        card["axiom"] = _entry("failed", err, "completeness error (relative)", str(m.get("axiom_note", "")))
    else:
        card["axiom"] = _entry("not checked", None, "", "the method promises no axiom" if status else "")
    verdicts = list(verdicts)
    if verdicts:
        v = verdicts[0]
        state = "failed" if any(x.get("passes") is False for x in verdicts) else (
            "checked" if any(x.get("passes") for x in verdicts) else "not checked")
        card["randomisation"] = _entry(state, _num(v.get("mean_similarity")),
                                       f"{v.get('mode', 'cascading')} similarity to the original "
                                       f"(null {_fmt(v.get('null'))}, margin {_fmt(v.get('margin'))})",
                                       null=_num(v.get("null")), margin=_num(v.get("margin")))
    elif _num(m.get("mprt_smooth")) is not None:
        card["randomisation"] = _entry("checked", _num(m.get("mprt_smooth")), "smooth MPRT |Spearman| (no null)")
    elif _num(m.get("mprt_efficient")) is not None:
        value = _num(m.get("mprt_efficient"))
        card["randomisation"] = _entry("failed" if value is not None and value <= 1 else "checked", value,
                                       "efficient MPRT entropy rise (> 1 passes)")
    else:
        card["randomisation"] = _entry("not checked")
    morf, lerf = _num(m.get("road_morf")), _num(m.get("road_lerf"))
    dele, ins = _num(m.get("auc_deletion")), _num(m.get("auc_insertion"))
    if morf is not None and lerf is not None:
        card["faithfulness"] = _entry("failed" if morf >= lerf else "checked", lerf - morf,
                                      "ROAD: LeRF - MoRF mean normalised score (> 0 passes)")
    elif dele is not None and ins is not None:
        card["faithfulness"] = _entry("failed" if dele >= ins else "checked", ins - dele,
                                      "insertion - deletion AUC (> 0 passes)")
    elif _num(m.get("region_aopc")) is not None:
        value = _num(m.get("region_aopc"))
        card["faithfulness"] = _entry("failed" if value is not None and value <= 0 else "checked", value,
                                      "region perturbation AOPC (> 0 passes)")
    else:
        card["faithfulness"] = _entry("not checked")
    auc, mass, frac = _num(m.get("roc_auc")), _num(m.get("mass_inside")), _num(m.get("mask_fraction"))
    if auc is not None:
        card["localisation"] = _entry("failed" if auc <= 0.5 else "checked", auc,
                                      "ROC AUC of the map against the ground truth (chance 0.5)")
    elif mass is not None:
        card["localisation"] = _entry("failed" if frac is not None and mass <= frac else "checked", mass,
                                      "relevance mass inside the ground truth")
    elif _num(m.get("energy_pointing")) is not None:
        card["localisation"] = _entry("checked", _num(m.get("energy_pointing")), "energy pointing game")
    else:
        card["localisation"] = _entry("not checked")
    rho = _num(m.get("stability_spearman"))
    if rho is not None:
        card["stability"] = _entry("failed" if rho < STABILITY_MIN_SPEARMAN else "checked", rho,
                                   f"mean pairwise rank correlation over {_over(m)} (>= {STABILITY_MIN_SPEARMAN} "
                                   "passes)")
    else:
        card["stability"] = _entry("not checked")
    for name, keys in _ERRORS.items():  # a check that raised: not checked, and why
        err = next((str(m[k]) for k in keys if m.get(k)), None)
        if err and card[name]["status"] == "not checked":
            card[name]["note"] = f"the check could not run: {err}"[:300]
    card["line"] = scorecard_line(card)
    return card


def _over(m: Mapping[str, Any]) -> str:
    """What a map's stability varied over: ``4 folds``, ``8 mirrors``, ``3 noisy inputs``, ..."""
    over = m.get("stability_over") or ("noise" if m.get("stability_source") == "input noise" else "members")
    n = m.get("stability_n")
    words = {"noise": "noisy inputs", "models": "models"}.get(str(over), str(over))
    return f"{n} {words}" if n else words


def _fmt(v: Any) -> str:
    n = _num(v)
    return "n/a" if n is None else f"{n:.3g}"


def scorecard_line(card: Mapping[str, Any]) -> str:
    """``axiom ok 0.002 · randomisation FAILED 0.91 · faithfulness - · ...`` (ok, FAILED, - not checked)."""
    marks = {"checked": "ok", "failed": "FAILED", "not checked": "-"}
    parts = []
    for name in SCORECARD:
        e = card.get(name) or {}
        mark = marks.get(str(e.get("status")), "-")
        parts.append(f"{name} {mark}{_text(e)}")
    return " · ".join(parts)


def verdicts_for(randomisation: Sequence[Mapping[str, Any]] | None,
                 record: MapRecord | Mapping[str, Any]) -> list[dict]:
    """The randomisation verdicts of ``record``'s method (and layer), target and volume."""
    record = _as_record(record)
    label = _label(record)
    out = []
    for entry in randomisation or []:
        if str(entry.get("volume")) == str(record.volume) and str(entry.get("target")) == str(record.target):
            v = (entry.get("verdicts") or {}).get(label)
            if v is not None:
                out.append({**v, "mode": entry.get("mode")})
    return out


def scorecard_html(records: Sequence[MapRecord | Mapping[str, Any]]) -> str:
    """The report's scorecard section: one row per map, one cell per check ('' with no scorecard)."""
    from html import escape

    rows = [r for r in map(_as_record, records) if r.ok and r.extra.get("trust")]
    if not rows:
        return ""
    style = {"checked": "trust-high", "failed": "trust-low", "not checked": ""}
    head = "".join(f"<th>{escape(c)}</th>" for c in ("map", *SCORECARD, "spread map"))
    body = []
    for r in rows:
        cells = [f"<td>{escape(str(r.file or _label(r)))}</td>"]
        for name in SCORECARD:
            e = r.extra["trust"].get(name) or {}
            text = str(e.get("status", "not checked")) + _text(e)
            hover = "; ".join(str(x) for x in (e.get("what"), e.get("note")) if x)
            cells.append(f'<td class="{style.get(str(e.get("status")), "")}" title="{escape(hover)}">'
                         f"{escape(text)}</td>")
        cells.append(f"<td>{escape(str(r.extra.get('stability_map') or ''))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return ("<h2>Trust scorecard</h2><p>What was verified about each map: checked (and passed), failed, or not "
            "checked, with the number (hover a cell for what it measures).</p>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")
