"""Forms are generated from the method registry (no method or parameter hard-coded)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.gui


def test_every_registered_method_has_a_generated_form(qtbot):
    from qtpy.QtWidgets import QCheckBox, QComboBox, QDoubleSpinBox, QLineEdit, QSpinBox

    from esegeta_engine.methods import list_methods
    from esegeta_engine.sample import UNet
    from esegeta_engine.models import list_layers
    from napari_esegeta._qt.method_panel import MethodPanel
    from napari_esegeta._run import make_method

    panel = MethodPanel()
    qtbot.addWidget(panel)
    specs = list_methods()
    assert list(panel.rows) == [s.name for s in specs]
    layers = list_layers(UNet(3, 1, 2, (4, 8)))
    panel.set_model_layers(layers)
    kinds = {"bool": QCheckBox, "int": (QSpinBox, QLineEdit), "float": (QDoubleSpinBox, QLineEdit),
             "ints": QLineEdit, "floats": QLineEdit, "str": (QComboBox, QLineEdit)}
    for spec in specs:
        row = panel.rows[spec.name]
        assert [p.name for p in row.form.params] == [p.name for p in spec.params]
        for p in spec.params:
            editor = row.form.editors[p.name]
            assert isinstance(editor, kinds[p.kind])
            assert p.help in editor.toolTip()
            if p.choices:
                assert [editor.itemText(i) for i in range(editor.count())] == list(p.choices)
            if isinstance(editor, (QSpinBox, QDoubleSpinBox)) and p.maximum is not None:
                assert editor.maximum() == pytest.approx(min(p.maximum, 2**31 - 1))
        assert (row.layer_combo is not None) == spec.needs_layer
        assert (row.nt_check is not None) == spec.noise_tunnel
        cfg = make_method(spec.name, row.form.values(), row.selected_layer(), None)
        assert cfg.params == row.form.values()
        if spec.needs_layer:
            assert row.selected_layer() in [n for n, _ in layers]
    # one group box per family, in registry order
    from qtpy.QtWidgets import QGroupBox

    boxes = [b.objectName() for b in panel.findChildren(QGroupBox)]
    assert boxes == [f"family_{f}" for f in dict.fromkeys(s.family for s in specs)]


def test_noise_tunnel_form_comes_from_the_engine_schema(qtbot):
    from esegeta_engine.config import NoiseTunnelConfig
    from esegeta_engine.methods import list_methods
    from napari_esegeta._qt.method_panel import MethodRow
    from napari_esegeta._run import make_method

    spec = next(s for s in list_methods() if s.noise_tunnel)
    row = MethodRow(spec)
    qtbot.addWidget(row)
    row.check.setChecked(True)
    row.nt_check.setChecked(True)
    values = row.noise_tunnel()
    assert set(values) <= set(NoiseTunnelConfig.model_fields)
    assert values["type"] in NoiseTunnelConfig.model_fields["type"].annotation.__args__
    row.nt_form.set_values({"samples": 3, "stdev": 0.2})
    cfg = make_method(spec.name, row.form.values(), None, row.noise_tunnel())
    assert cfg.noise_tunnel.samples == 3 and cfg.noise_tunnel.stdev == pytest.approx(0.2)


def test_bad_parameter_text_gives_registry_message(qtbot):
    from esegeta_engine.errors import EsegetaError
    from esegeta_engine.methods import list_methods
    from napari_esegeta._qt.method_panel import MethodRow
    from napari_esegeta._run import make_method

    spec = next(s for s in list_methods() if any(p.kind == "ints" for p in s.params))
    p = next(p for p in spec.params if p.kind == "ints")
    row = MethodRow(spec)
    qtbot.addWidget(row)
    row.form.editors[p.name].setText("8 x")
    with pytest.raises(EsegetaError) as info:
        make_method(spec.name, row.form.values())
    assert p.name in str(info.value)
    row.form.editors[p.name].setText("8, 8, 4")
    assert make_method(spec.name, row.form.values()).params[p.name] == [8, 8, 4]


def test_every_evaluation_section_switched_on_gives_a_valid_config(qtbot):
    """A list field with a default factory (ROAD's percentages) is a comma-separated list with its default:
    it was the text "PydanticUndefined", and ticking ROAD then Run failed with "Input should be a valid list"."""
    from esegeta_engine.config_scores import RoadConfig
    from napari_esegeta._qt.evaluate_form import EvaluationForm

    form = EvaluationForm()
    qtbot.addWidget(form)
    form.set_checked(**{name: True for name in form.checks})
    cfg = form.config()
    assert cfg.road is not None and cfg.road.percentages == RoadConfig().percentages
    form.set_values("road", percentages=[0.2, 0.4])
    assert form.config().road.percentages == [0.2, 0.4]
