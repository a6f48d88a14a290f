"""A new map's arrival on napari's GUI thread (issue 19, event-loop gaps): napari redraws the whole canvas
for every layer whose ``visible`` is set (and reslices a layer set visible even when it already is), so the
Explain tab sets it only where it changes, and hides the earlier maps on the next event-loop turn, apart from
``add_image``'s own work. Counted on napari's ``visible`` events."""

from __future__ import annotations

import types

import numpy as np
import pytest


def _prepared(image, i: int):
    from napari_esegeta._geometry import copy_geometry
    from napari_esegeta._layers import result_layer_data
    from napari_esegeta._run import PreparedMap

    m = np.random.default_rng(i).standard_normal(image.data.shape).astype(np.float32)
    data, kw, _ = result_layer_data(m, method="saliency", method_label=f"saliency{i}", target_label="vessel",
                                    provenance={"class": 1, "target": "argmax", "input_layer": image.name},
                                    geometry=copy_geometry(image), nifti=image.metadata.get("nifti"))
    return PreparedMap(types.SimpleNamespace(evaluations=1), data, kw)


@pytest.mark.gui
def test_a_new_map_sets_visible_only_where_it_changes_after_its_add(qtbot, docked) -> None:
    viewer, image, w = docked
    ex = w["explain"]
    for i in range(3):  # three maps: the last one visible
        ex._on_event(_prepared(image, i))
        qtbot.wait(50)
    maps = [viewer.layers[name] for name in ex.added]
    assert [m.visible for m in maps] == [False, False, True]
    changed: list[str] = []
    for layer in viewer.layers:
        layer.events.visible.connect(lambda ev, name=layer.name: changed.append(name))
    new = _prepared(image, 3)
    ex._on_event(new)
    layer = viewer.layers[new.kwargs["name"]]
    layer.events.visible.connect(lambda ev: changed.append(layer.name))
    assert changed == []  # the add alone in this event-loop turn
    qtbot.waitUntil(lambda: bool(changed), timeout=5000)
    qtbot.wait(50)
    assert changed == [maps[-1].name]  # one event: the map shown until now is hidden; no other layer touched
    assert [m.visible for m in maps] == [False, False, False] and layer.visible and image.visible
    assert ex.colorbar.layer is layer


@pytest.mark.gui
def test_a_map_removed_before_the_next_turn_is_left_alone(qtbot, docked) -> None:
    viewer, image, w = docked
    ex = w["explain"]
    ex._on_event(_prepared(image, 0))
    qtbot.wait(50)
    first = viewer.layers[ex.added[0]]
    new = _prepared(image, 1)
    ex._on_event(new)
    viewer.layers.remove(new.kwargs["name"])  # before the deferred hide runs
    qtbot.wait(100)
    assert first.visible  # nothing was hidden for a map that is gone


@pytest.mark.gui
def test_the_hidden_evaluate_curves_are_not_redrawn_when_a_map_arrives(qtbot, make_napari_viewer) -> None:
    """The Evaluate tab's matplotlib canvas, hidden behind the Explain tab, is resized whenever the dock's layout
    changes (a map added): it draws nothing until its tab is shown, then once (counted on matplotlib's
    ``draw_event``; a whole figure draw took 0.3-1.4 s of the GUI thread)."""
    from napari_esegeta._qt.main_widget import EsegetaWidget
    from napari_esegeta._sample_data import phantom_volume_data

    viewer = make_napari_viewer(show=True)
    data, kwargs, _ = phantom_volume_data((24, 24, 24), 3)[0]
    image = viewer.add_image(data, **kwargs)
    dock = EsegetaWidget(viewer)
    viewer.window.add_dock_widget(dock, name="esegeta", area="right")
    ex = dock.show_tab("Explain")
    qtbot.wait(300)
    draws: list[object] = []
    canvas = dock.evaluate.curves_canvas
    canvas.figure.canvas.mpl_connect("draw_event", draws.append)
    for i in range(2):
        ex._on_event(_prepared(image, i))
        canvas.widget.resize(canvas.widget.width() + 7, canvas.widget.height() + 5)  # as a relayout does
        canvas.draw({})  # and as a cleared table does
        qtbot.wait(200)
    assert draws == []
    dock.show_tab("Evaluate")
    qtbot.waitUntil(lambda: len(draws) >= 1, timeout=5000)
    qtbot.wait(200)
    assert len(draws) == 1


@pytest.mark.gui
def test_a_map_insertion_costs_napari_what_a_bare_add_image_does(qtbot, make_napari_viewer) -> None:
    """What our call pattern could add to napari's own cost (issue 19, the event-loop floor), counted against a bare
    ``viewer.add_image`` of the same map in a viewer without the dock: canvas draws and resizes after the
    insertion (no second refresh, the layer is not re-rendered after it is shown), and data statistics computed on
    the GUI thread (none: the layer comes prebuilt, with its contrast limits)."""
    import napari.layers.image.image as napari_image

    from napari_esegeta._layers import image_layers, is_result_layer
    from napari_esegeta._sample_data import phantom_volume_data

    viewers = []
    for _ in range(2):  # ours (the one dock) and bare napari, both at 1366x768 with the same scan
        v = make_napari_viewer(show=True)
        v.window._qt_window.resize(1366, 768)
        data, kwargs, _ = phantom_volume_data((32, 32, 32), 3)[0]
        viewers.append((v, v.add_image(data, **kwargs)))
    (viewer, image), (bare, bare_image) = viewers
    _, dock = viewer.window.add_plugin_dock_widget("napari-esegeta", "esegeta")
    ex = dock.show_tab("Explain")
    ex._on_event(_prepared(image, 0))  # a map already shown
    first = _prepared(bare_image, 0)
    bare.add_image(first.data, **first.kwargs)
    qtbot.wait(300)
    ranges: list[int] = []
    real = napari_image.calc_data_range

    def counted(*args, **kw):
        ranges.append(1)
        return real(*args, **kw)

    def count(v, act) -> tuple[int, int]:
        canvas = v.window._qt_viewer.canvas._scene_canvas
        draws, resizes = [], []
        on_draw, on_resize = (lambda e: draws.append(1)), (lambda e: resizes.append(1))
        canvas.events.draw.connect(on_draw)
        canvas.events.resize.connect(on_resize)
        act()
        qtbot.wait(800)
        canvas.events.draw.disconnect(on_draw)
        canvas.events.resize.disconnect(on_resize)
        return len(draws), len(resizes)

    new = _prepared(image, 1)
    new.layers = image_layers(new.data, new.kwargs)  # as the worker builds it

    def bare_add() -> None:  # the same maps on screen after it as after ours: the earlier one hidden
        for layer in bare.layers:
            if is_result_layer(layer):
                layer.visible = False
        other = _prepared(bare_image, 1)
        bare.add_image(other.data, **other.kwargs)

    napari_image.calc_data_range = counted
    try:
        ours = count(viewer, lambda: ex._on_event(new))
        assert ranges == []  # no data statistics on the GUI thread
        reference = count(bare, bare_add)
    finally:
        napari_image.calc_data_range = real
    assert ours == reference == (1, 0), (ours, reference)  # one draw, no resize, as napari alone
