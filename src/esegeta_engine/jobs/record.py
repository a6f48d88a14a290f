"""One record per map: what the manifest, resume, the report, cohorts and napari layers share.

A :class:`MapRecord` is the provenance of one job's result on one volume — the job (method,
resolved parameters, layer, noise tunnel, class, target label, key), how it ran (status,
seconds, model evaluations, execution form) and what it produced (file, checksum, statistics,
metrics). It is written as one JSON object (:meth:`MapRecord.to_json`) in ``manifest.json``'s
``results`` and read back with :meth:`MapRecord.from_json`, which keeps fields it does not know
(written by a newer version, or added by a caller) in :attr:`MapRecord.extra`, so a record
survives a round trip unchanged.

Single runs and cohorts write the same record; cohort jobs add ``model``, ``subject``,
``group``, ``worker`` and ``device``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

_ORDER = ("key", "model", "subject", "group", "method", "label", "layer", "target", "class", "noise_tunnel",
          "params", "status", "seconds", "model_evaluations", "expected_evaluations", "volume", "file",
          "model_inputs", "stats", "metrics", "sha256", "execution", "notes", "patch_evaluations", "worker",
          "device", "error", "resumed", "planned")
_ALWAYS = {"key", "method", "layer", "target", "class", "noise_tunnel", "params", "status", "seconds",
           "model_evaluations", "expected_evaluations"}
"""Fields written even when empty (the manifest's long-standing shape)."""


@dataclass
class MapRecord:
    """The provenance of one map (or of one failed job on one volume).

    Attributes
    ----------
    key : str
        The job key (:func:`esegeta_engine.jobs.plan.job_key`).
    method : str
        Registered method name.
    label : str or None
        ``method[@layer][+noise]`` where it differs from ``method`` (cohort tables group by it).
    target : str
        The target's label of the class (``argmax-1``; ``volume`` for methods explaining no class).
    cls : int
        The explained score index (``class`` in JSON).
    status : str
        ``ok``, ``failed``, ``timeout`` or ``cancelled``.
    volume : str or None
        The volume's stem (single runs) or subject (cohorts).
    file : str or None
        The map's path relative to the run folder.
    sha256 : str or None
        SHA-256 of the map file's bytes.
    resumed : bool or None
        Kept from an earlier run in the same folder (``--resume``).
    planned : bool or None
        ``False`` for a map an earlier plan made that the current plan does not contain
        (kept and listed, never orphaned).
    extra : dict
        Fields this version does not know; written back unchanged.
    """

    key: str
    method: str
    target: str
    cls: int
    status: str
    layer: str | None = None
    noise_tunnel: dict[str, Any] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    model_evaluations: int = 0
    expected_evaluations: int | None = None
    label: str | None = None
    volume: str | None = None
    file: str | None = None
    sha256: str | None = None
    model_inputs: int | None = None
    stats: dict[str, float] | None = None
    metrics: dict[str, Any] | None = None
    execution: dict[str, Any] | None = None
    notes: list[str] | None = None
    patch_evaluations: int | None = None
    model: str | None = None
    subject: str | None = None
    group: str | None = None
    worker: str | None = None
    device: str | None = None
    error: str | None = None
    resumed: bool | None = None
    planned: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """The job produced its map."""
        return self.status == "ok"

    def to_json(self) -> dict[str, Any]:
        """The manifest's JSON object (``class`` for :attr:`cls`; empty optional fields left out)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        values["class"] = values.pop("cls")
        if values.get("label") in (None, self.method):
            values.pop("label")
        out = {k: values[k] for k in _ORDER if k in values and (k in _ALWAYS or values[k] is not None)}
        if self.notes == []:
            out.pop("notes", None)
        if not self.patch_evaluations:
            out.pop("patch_evaluations", None)
        return {**out, **self.extra}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MapRecord:
        """A record from its JSON object; unknown fields go to :attr:`extra`.

        Raises
        ------
        ValueError
            If ``data`` is not a JSON object with a ``method`` and a ``status``.
        """
        if not isinstance(data, dict) or not isinstance(data.get("method"), str) or "status" not in data:
            raise ValueError("not a map record (no method or status)")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "cls"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names and k != "class"}
        known.setdefault("key", "")
        known.setdefault("target", "")
        return cls(cls=int(data.get("class", 0) or 0), extra=extra, **known)

    def replace(self, **changes: Any) -> MapRecord:
        """A copy with ``changes``."""
        return dataclasses.replace(self, **changes)


def map_stats(array: Any) -> dict[str, float]:
    """Summary statistics written with every map (min, max, sum, mean absolute value)."""
    import numpy as np

    return {"min": float(array.min()), "max": float(array.max()), "sum": float(array.sum()),
            "abs_mean": float(np.abs(array).mean())}
