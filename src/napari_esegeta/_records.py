"""A map layer's record: its metadata read as the engine's :class:`~esegeta_engine.jobs.record.MapRecord` (no Qt).

Explain maps carry the engine's record (``metadata["esegeta"]["record"]``, the manifest's shape);
layers made before it existed, randomisation stages and cohort maps carry only the provenance, from
which the same record is rebuilt. Readers (Evaluate, saving, Compare) ask the record for the job's
fields (method, parameters, layer, class, execution, notes) instead of indexing the dict; the
provenance keeps what a record does not hold (the target's kind, voxel, ROI layer, input layer).
"""

from __future__ import annotations

from typing import Any

from esegeta_engine.jobs.record import MapRecord


def provenance(layer: Any) -> dict[str, Any]:
    """``metadata["esegeta"]`` of a layer (empty for layers this plugin did not make)."""
    return dict(((getattr(layer, "metadata", None) or {}).get("esegeta")) or {})


def layer_record(layer: Any) -> MapRecord | None:
    """The map's :class:`MapRecord`, or None for a layer that is not an attribution map."""
    meta = provenance(layer)
    if not isinstance(meta.get("method"), str):
        return None
    raw = meta.get("record")
    if isinstance(raw, dict):
        try:
            return MapRecord.from_json(raw)
        except ValueError:
            pass
    return MapRecord(key=str(meta.get("key") or ""), method=meta["method"], target=str(meta.get("target_label") or ""),
                     cls=int(meta.get("class") or 0), status="ok", layer=meta.get("layer"),
                     noise_tunnel=meta.get("noise_tunnel"), params=dict(meta.get("params") or {}),
                     label=meta.get("label"), execution=meta.get("execution") or None, notes=meta.get("notes"))


def record_label(record: MapRecord) -> str:
    """``method[@layer][+noise]`` (the record leaves it out where it equals the method)."""
    return record.label or record.method
