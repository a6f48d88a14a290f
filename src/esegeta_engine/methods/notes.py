"""Notes a method attaches to its result: caveats the user must see next to the map.

A method that runs but cannot apply its rule everywhere (a guided rule on a
network that calls activations as functions, DeepLIFT on a module without a
rule) raises nothing: it logs a warning and appends one sentence to
``ctx.extra["notes"]``, a list of strings the pipeline copies into the job's
record in the manifest and shows as the result's status.
"""

from __future__ import annotations

import logging

from esegeta_engine.methods.registry import MethodContext

log = logging.getLogger("esegeta_engine")

NOTES_KEY = "notes"


def notes_of(ctx: MethodContext) -> list[str]:
    """Return the (shared, mutable) list of notes of ``ctx``, creating it if needed."""
    notes = ctx.extra.get(NOTES_KEY)
    if not isinstance(notes, list):
        notes = []
        ctx.extra[NOTES_KEY] = notes
    return notes


def add_note(notes: list[str], text: str) -> None:
    """Append ``text`` to ``notes`` once and log it as a warning."""
    if text not in notes:
        notes.append(text)
        log.warning("%s", text)
