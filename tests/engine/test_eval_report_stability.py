"""The report draws each map's stability spread next to the map, with the rank correlation."""

from __future__ import annotations

import base64
import json
import re

import nibabel as nib
import numpy as np
import pytest

from esegeta_engine.config import parse_config
from esegeta_engine.evaluation.figures_stability import stability_figure, stability_title
from esegeta_engine.pipeline import run

from test_regions import Blur, phantom


@pytest.mark.parametrize("dims", [2, 3])
def test_the_report_shows_the_spread_map_and_its_numbers(tmp_path, dims):
    import torch

    img, gt, _ = phantom(dims)
    affine = np.diag([-0.8, 0.9, 1.5, 1.0])  # a flipped first axis, as the other figures' tests use
    nib.save(nib.Nifti1Image(img, affine), tmp_path / "vol.nii.gz")
    torch.jit.script(Blur(dims).eval()).save(str(tmp_path / "net.pt"))
    res = run(parse_config({
        "model": {"path": "net.pt"}, "volumes": ["vol.nii.gz"], "preprocess": {"spatial_dims": dims},
        "target": {"classes": [1]}, "methods": [{"name": "saliency"}],
        "evaluation": {"stability": {"samples": 3}, "report": True}}, base=tmp_path))
    (rec,) = res.records
    m = rec["metrics"]
    page = (res.out_dir / "report.html").read_text()
    png = rec["stability_map"].removesuffix(".nii.gz") + ".png"
    # the figure is embedded as an image, in its own section
    hit = re.search(r'<img src="data:image/png;base64,([^"]+)" alt="figures/' + re.escape(png) + '"/>', page)
    assert hit is not None and "<summary>Stability · " in page
    drawn = (res.out_dir / "figures" / png).read_bytes()
    assert base64.b64decode(hit.group(1)) == drawn and drawn[:4] == b"\x89PNG"
    # the numbers: the rank correlation and the mean spread, in the stability table
    table = page[page.index("<h2>Stability: each map"):]
    assert f'data-v="{m["stability_spearman"]!r}"' in table and f'data-v="{m["stability_std_mean"]!r}"' in table
    assert m["stability_n"] == 3 and m["stability_source"] == "input noise"
    metrics = json.loads((res.out_dir / "metrics.json").read_text())
    assert any(r.get("stability_spearman") == m["stability_spearman"] for r in metrics["rows"])


def test_the_figure_has_the_map_row_and_the_spread_row(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    vol = rng.random((6, 7, 5)).astype(np.float32)
    out = stability_figure(vol, rng.normal(size=vol.shape), rng.random(vol.shape), tmp_path / "s.png",
                           title="saliency", spearman=0.8123, n=4, source="members", affine=np.eye(4))
    w, h = Image.open(out).size
    assert h > 500 and w > 3 * 300  # two rows of three views
    assert stability_title(0.8123, 4, "members") == "mean pairwise |Spearman| 0.812 over 4 members"
    assert stability_title(float("nan"), 3, "input noise") == "mean pairwise |Spearman| undefined over 3 noisy inputs"
