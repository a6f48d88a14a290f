"""Component targets in the plugin (issue 17.2): one map per structure, listed in the Compare tab, and a click
moves the view to the structure's centroid (in RAS mm, through the scan's affine)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from plugin_helpers import wait_until

# three separate cubes: (start, size) per axis; centroids are start + (size - 1) / 2
CUBES = [((2, 3, 2), (4, 4, 4)), ((14, 4, 10), (5, 3, 4)), ((6, 16, 14), (3, 5, 3))]
SHAPE = (24, 24, 20)


class ThresholdNet(nn.Module):
    """Class 1 where the (min-max normalised) input is above 0.5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([0.5 - x, x - 0.5], 1) * 10


@pytest.mark.gui
def test_components_are_listed_and_a_click_jumps_to_the_centroid(qtbot, docked) -> None:
    from esegeta_engine.io import Volume
    from napari_esegeta._reader import volume_layer_data

    viewer, _, w = docked
    data = np.zeros(SHAPE, np.float32)
    for start, size in CUBES:
        data[tuple(slice(s, s + n) for s, n in zip(start, size))] = 1.0
    affine = np.array([[-1.5, 0, 0, 30], [0, 1.0, 0, -20], [0, 0, 2.0, 5], [0, 0, 0, 1]])
    arr, kwargs, _ = volume_layer_data(Volume(data, affine), name="cubes")
    image = viewer.add_image(arr, **kwargs)
    session = w["model"].session
    session.set_model(ThresholdNet().eval(), "threshold", session.preprocess, None)
    ex = w["explain"]
    ex.image_combo.setCurrentText(image.name)
    assert ex.image_combo.layer() is image
    ex.kind_combo.setCurrentText("argmax")
    ex.classes_edit.setText("1")
    ex.components_check.setChecked(True)
    ex.methods.check("saliency")
    assert ex.run() is not None
    wait_until(qtbot, lambda: not ex.running, 120)
    assert len(ex.added) == 3, ex.status.text()
    cw = w["compare"]
    cw.refresh()
    assert cw.structures.count() == 3 and cw.structures.isVisibleTo(cw)
    sizes = sorted((int(np.prod(n)) for _, n in CUBES), reverse=True)  # rank 1 = largest
    for i in range(3):
        assert f"#{i + 1} · {sizes[i]} voxels" in cw.structures.item(i).text()
    item = cw.structures.item(2)  # the smallest cube
    cw.structures.itemClicked.emit(item)
    start, size = min(CUBES, key=lambda c: np.prod(c[1]))
    centroid = np.asarray(start, float) + (np.asarray(size, float) - 1) / 2
    expected = affine[:3, :3] @ centroid + affine[:3, 3]  # RAS mm, independent of the layer's transform
    assert np.allclose(viewer.dims.point, expected, atol=1.0 + 1e-6), (viewer.dims.point, expected)
    shown = viewer.layers[item.data(0x0100)]
    assert shown.visible and sum(ly.visible for ly in viewer.layers if ly.name in ex.added) == 1
