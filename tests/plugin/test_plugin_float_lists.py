"""Number-list parameters (``floats``, e.g. extremal perturbation's areas) in the generated forms."""

from __future__ import annotations

import pytest


def test_float_list_parameter_round_trips_through_the_form(qtbot):
    from esegeta_engine.errors import EsegetaError
    from esegeta_engine.methods import get_method
    from napari_esegeta._params import parse_floats, uses_line_edit
    from napari_esegeta._qt.method_panel import MethodRow
    from napari_esegeta._run import make_method

    spec = get_method("extremal_perturbation")
    param = spec.param("areas")
    assert param.kind == "floats" and uses_line_edit(param)
    assert parse_floats("0.1") == 0.1 and parse_floats("0.05, 0.2 0.4") == [0.05, 0.2, 0.4]
    assert parse_floats("") is None and parse_floats("0.1 x") == "0.1 x"
    row = MethodRow(spec)
    qtbot.addWidget(row)
    row.form.editors["areas"].setText("0.05, 0.2")
    cfg = make_method(spec.name, row.form.values())
    assert cfg.params["areas"] == [0.05, 0.2]
    assert spec.resolve_params(cfg.params)["areas"] == (0.05, 0.2)
    row.form.editors["areas"].setText("0.1 x")
    with pytest.raises(EsegetaError, match="areas"):
        make_method(spec.name, row.form.values())
