"""*Side by side* and its undo as one scene-graph update (issue 19, event-loop gaps): napari 0.9 redraws the
canvas for every layer added, moved or shown and every grid field set; inside one ``layers.batched_update``
it updates once at the end. ``visible`` is set only on layers whose visibility changes. Counted on napari's
events."""

from __future__ import annotations

import pytest

from test_plugin_map_arrival import _prepared


@pytest.mark.gui
def test_side_by_side_and_back_are_one_batch_each(qtbot, docked) -> None:
    from napari_esegeta import _compare as C

    viewer, image, w = docked
    ex = w["explain"]
    for i in range(2):
        ex._on_event(_prepared(image, i))
        qtbot.wait(50)
    maps = [viewer.layers[name] for name in ex.added]
    import gc

    batches: list[str] = []
    frozen: list[int] = []  # objects left out of napari's collection at the batch's end
    viewer.layers.events.begin_batch.connect(lambda ev: batches.append("begin"))
    viewer.layers.events.end_batch.connect(lambda ev: (batches.append("end"), frozen.append(gc.get_freeze_count())))
    shown: list[str] = []
    for layer in viewer.layers:
        layer.events.visible.connect(lambda ev, name=layer.name: shown.append(name))
    was_visible = {ly.name: ly.visible for ly in viewer.layers}
    viewer.layers.selection.active = maps[1]
    state = C.arrange_side_by_side(viewer, image, maps)
    assert batches == ["begin", "end"]
    # arranging removes no layer: napari's full collection skips the objects made before, then all is as it was
    assert frozen[0] > 0 and gc.get_freeze_count() == 0
    grid = viewer.canvas.grid
    assert grid.enabled and grid.stride == 2 and len(state.copies) == 2
    desired = [state.copies[0], maps[0], state.copies[1], maps[1]]
    assert list(viewer.layers)[:4] == desired and all(ly.visible for ly in desired)
    # only the layers whose visibility changed: the hidden first map shown, the scan hidden
    assert sorted(shown) == sorted(n for n, v in was_visible.items() if v != (viewer.layers[n] in desired))
    assert sorted(shown) == sorted([maps[0].name, image.name])
    batches.clear()
    shown.clear()
    C.restore_layout(viewer, state)
    assert batches == ["begin", "end"] and not grid.enabled
    assert frozen[1] == 0  # the undo removes the copies: napari's full collection is left as it is
    assert viewer.layers.selection.active is maps[1]  # the selection from before (a copy had taken it)
    assert {ly.name: ly.visible for ly in viewer.layers} == was_visible
    assert sorted(shown) == sorted([maps[0].name, image.name])


def test_young_collection_leaves_an_earlier_freeze_alone() -> None:
    """Objects frozen before the block (someone else's ``gc.freeze()``) stay frozen after it: the block
    freezes nothing then, as ``gc.unfreeze`` would thaw theirs too. Alone, it freezes and thaws its own."""
    import gc

    from napari_esegeta._compare import _young_collection_only

    assert gc.get_freeze_count() == 0
    with _young_collection_only():
        inside = gc.get_freeze_count()
    assert inside > 0 and gc.get_freeze_count() == 0
    gc.freeze()  # the process's own freeze, made before the block
    try:
        theirs = gc.get_freeze_count()
        with _young_collection_only():
            assert gc.get_freeze_count() == theirs
        assert gc.get_freeze_count() == theirs
    finally:
        gc.unfreeze()


def _two_maps_checked(qtbot, docked):
    """Two prepared maps arrive in the Explain tab and are checked in Compare: (viewer, explain, compare)."""
    viewer, image, w = docked
    ex, cw = w["explain"], w["compare"]
    for i in range(2):
        ex._on_event(_prepared(image, i))
        qtbot.wait(50)
    cw.refresh()
    cw.set_checked(list(ex.added))
    return viewer, ex, cw


@pytest.mark.gui
def test_side_by_side_runs_one_layer_insertion_per_event_loop_turn(qtbot, docked, monkeypatch) -> None:
    """The click adds one hidden base view; each later turn (a zero timer) one more; the grid comes on the turn
    after the last, the cells are fitted on the next: 2 maps -> 4 turns. Turns are driven by hand here."""
    import napari_esegeta._qt.compare_widget as CW

    viewer, ex, cw = _two_maps_checked(qtbot, docked)
    scheduled: list = []
    monkeypatch.setattr(CW.QTimer, "singleShot", lambda ms, f: scheduled.append(f))
    inserted: list[str] = []
    viewer.layers.events.inserted.connect(lambda ev: inserted.append(ev.value.name))
    grid = viewer.canvas.grid
    assert cw.compare() and cw.arranging
    per_turn = [(len(inserted), grid.enabled)]
    while scheduled:
        scheduled.pop(0)()
        per_turn.append((len(inserted), grid.enabled))
    assert per_turn == [(1, False), (2, False), (2, True), (2, True)] and not cw.arranging
    assert all(viewer.layers[n].visible for n in inserted)  # the copies, hidden until the grid's turn
    assert list(viewer.layers)[:4] == [viewer.layers[inserted[0]], viewer.layers[ex.added[0]],
                                       viewer.layers[inserted[1]], viewer.layers[ex.added[1]]]
    # Cancel between turns: the steps left are dropped, the layout is as before
    names = [ly.name for ly in viewer.layers]
    cw.uncompare()
    before = [ly.name for ly in viewer.layers]
    assert cw.compare() and len(scheduled) == 1
    cw.uncompare()
    assert not cw.arranging and [ly.name for ly in viewer.layers] == before and not grid.enabled
    scheduled.pop(0)()  # the turn that was pending: nothing left to do
    assert [ly.name for ly in viewer.layers] == before and len(names) == len(before) + 2


@pytest.mark.gui
def test_a_failing_side_by_side_step_restores_the_layout_and_says_so(qtbot, docked, monkeypatch) -> None:
    """A step that raises on a later turn (a map removed meanwhile) ends Side by side: the layout before,
    one status line, no step left pending."""
    import napari_esegeta._qt.compare_widget as CW

    viewer, ex, cw = _two_maps_checked(qtbot, docked)
    before = [ly.name for ly in viewer.layers]
    scheduled: list = []
    monkeypatch.setattr(CW.QTimer, "singleShot", lambda ms, f: scheduled.append(f))
    assert cw.compare() and cw.arranging

    def gone() -> None:
        raise KeyError("the map was deleted")

    cw._steps[0] = gone
    scheduled.pop(0)()
    assert not cw.arranging and not scheduled
    assert [ly.name for ly in viewer.layers] == before and not viewer.canvas.grid.enabled
    assert "Side by side stopped" in cw.status.text() and "deleted" in cw.status.text()
