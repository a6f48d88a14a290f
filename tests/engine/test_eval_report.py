"""Figures are real PNGs; the report shows every method and figure, parses strictly, and its numbers match."""

from __future__ import annotations

import base64
import csv
import json
import math
import struct
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from esegeta_engine.errors import ConfigError, VolumeError
pytest.importorskip("matplotlib")

from esegeta_engine.evaluation import figures as F  # noqa: E402
from esegeta_engine.evaluation.faithfulness import faithfulness_curves  # noqa: E402
from esegeta_engine.evaluation.report import build_report_from_run, write_report  # noqa: E402

AFFINE = np.diag([0.5, 0.5, 0.8, 1.0])
SHAPE = (16, 14, 10)
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def vessels(shape=SHAPE) -> np.ndarray:
    idx = np.indices(shape)
    return (idx[0] - shape[0] // 2) ** 2 + (idx[1] - shape[1] // 3) ** 2 < 4


def check_png(path: Path) -> None:
    assert path.is_file()
    w, h = png_size(path)
    assert 200 <= w <= 2500 and 150 <= h <= 2500
    assert 3_000 < path.stat().st_size < 1_500_000


@pytest.mark.parametrize("dims", [2, 3])
def test_figures_write_pngs_for_signed_and_unsigned_maps(tmp_path, dims):
    rng = np.random.default_rng(0)
    shape = SHAPE[:dims]
    vol = rng.random(shape).astype(np.float32) + 2 * vessels(SHAPE)[(...,) + (0,) * (3 - dims)]
    unsigned = np.abs(rng.standard_normal(shape))
    signed = rng.standard_normal(shape)
    spacing = (0.5, 0.5, 0.8)[:dims]
    check_png(F.mip_figure(vol, unsigned, tmp_path / "u.png", title="unsigned", spacing=spacing))
    check_png(F.mip_figure(vol, signed, tmp_path / "s.png", title="signed", spacing=spacing))
    check_png(F.montage_figure(vol, signed, tmp_path / "m.png", n_slices=6))
    check_png(F.comparison_grid(vol, {"a": unsigned, "b": signed}, tmp_path / "g.png", spacing=spacing))
    check_png(F.randomisation_strip(vol, {"a": [signed, unsigned], "b": [unsigned, signed]},
                                    ["original", "random"], tmp_path / "r.png"))
    if dims == 3:  # three views side by side, one for 2D
        assert png_size(tmp_path / "u.png")[0] > 1.8 * png_size(tmp_path / "u.png")[1]


def test_figures_reject_mismatched_grids(tmp_path):
    with pytest.raises(VolumeError, match="does not match"):
        F.mip_figure(np.zeros((8, 8, 8)), np.zeros((8, 8, 7)), tmp_path / "x.png")


def test_curves_figure_from_curves_and_dicts(tmp_path):
    import torch

    x = torch.rand(1, 1, 6, 6)
    c = faithfulness_curves(lambda t: t.flatten(1).sum(1, keepdim=True), x, x, 0, steps=4, baseline="zero")
    check_png(F.curves_figure({"true": c, "random": c.to_dict()}, tmp_path / "c.png", title="curves"))


class StrictHTML(HTMLParser):
    """Every non-void tag closes in order; void tags never close; collects img src."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.srcs: list[str] = []
        self.alts: list[str] = []
        self.hrefs: list[str] = []
        self.decl = ""

    def handle_decl(self, decl: str) -> None:
        self.decl = decl

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])
            self.alts.append(dict(attrs).get("alt", ""))
        if dict(attrs).get("href") is not None:
            self.hrefs.append(dict(attrs)["href"])
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        if tag not in VOID:
            self.errors.append(f"self-closed <{tag}/> at {self.getpos()}")
        self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag):
        if tag in VOID or not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}> at {self.getpos()}, open: {self.stack[-3:]}")
        else:
            self.stack.pop()


def parse_strict(text: str) -> StrictHTML:
    p = StrictHTML()
    p.feed(text)
    p.close()
    assert not p.errors and not p.stack, (p.errors, p.stack)
    assert p.decl.lower() == "doctype html"
    ET.fromstring(text.encode("utf-8"))  # well-formed XML too (raises ParseError otherwise)
    return p


def fake_run(tmp_path: Path) -> Path:
    """A run folder in the pipeline's format: a volume, two maps, one failed job."""
    run = tmp_path / "run"
    run.mkdir()
    rng = np.random.default_rng(0)
    v = vessels()
    vol = (0.2 + 0.05 * rng.random(SHAPE) + v).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, AFFINE), tmp_path / "tof scan.nii.gz")
    nib.save(nib.Nifti1Image(v.astype(np.uint8), AFFINE), tmp_path / "gt.nii.gz")
    maps = {"saliency": np.abs(v + 0.1 * rng.standard_normal(SHAPE)),
            "layer_gradcam@conv2": v - 0.3 * rng.random(SHAPE)}
    results = []
    for method, arr in maps.items():
        name, layer = (method.split("@") + [None])[:2]
        file = f"tof-scan__{method}__argmax-class1.nii.gz"
        nib.save(nib.Nifti1Image(arr.astype(np.float32), AFFINE), run / file)
        results.append({"method": name, "layer": layer, "target": "argmax-class1", "class": 1,
                        "noise_tunnel": None, "params": {}, "status": "ok", "seconds": 0.25,
                        "model_evaluations": 3, "volume": "tof-scan", "file": file,
                        "stats": {"min": float(arr.min()), "max": float(arr.max())}})
    results.append({"method": "occlusion", "layer": None, "target": "argmax-class1", "class": 1,
                    "params": {}, "status": "failed", "seconds": 0.1, "model_evaluations": 0,
                    "volume": "tof-scan", "error": "<script>alert('x')</script> & too big"})
    manifest = {"status": "completed", "created": "2025-01-01T00:00:00+00:00", "duration_s": 1.5,
                "config": {"model": {"path": "model.pt"}, "target": {"kind": "argmax"},
                           "preprocess": {"spatial_dims": 3}},
                "environment": {"torch": "2.x", "numpy": "2.x"}, "seed": 0, "device": "cpu",
                "volumes": [{"path": str(tmp_path / "tof scan.nii.gz"), "shape": list(SHAPE),
                             "spacing_mm": [0.5, 0.5, 0.8], "affine": AFFINE.tolist()}],
                "results": results}
    (run / "manifest.json").write_text(json.dumps(manifest))
    return run


def test_report_from_run_has_every_method_figure_and_number(tmp_path):
    run = fake_run(tmp_path)
    # A metric row with NaN and one with None, merged by file / by method and target.
    write_report(run, metrics=[{"file": "tof-scan__saliency__argmax-class1.nii.gz", "infidelity": float("nan")},
                               {"method": "layer_gradcam", "target": "argmax-class1", "infidelity": 0.5,
                                "sensitivity": None}])
    page_path = build_report_from_run(run, mask=tmp_path / "gt.nii.gz")
    text = page_path.read_text(encoding="utf-8")
    parsed = parse_strict(text)
    for method in ("saliency", "layer_gradcam", "occlusion", "conv2"):
        assert method in text
    assert "<script>alert" not in text and "&lt;script&gt;alert" in text
    # one MIP and one slice montage per map + one comparison grid, all embedded, equal to the files
    assert len(parsed.srcs) == 5
    assert sum(alt.endswith("__montage.png") for alt in parsed.alts) == 2
    for src, alt in zip(parsed.srcs, parsed.alts):
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]) == (run / alt).read_bytes()
        check_png(run / alt)
    assert 'class="undef" data-v="">undefined</td>' in text
    assert 'class="sortable"' in text and 'download="metrics.csv"' in text and 'download="metrics.json"' in text
    assert all(h.startswith("data:") for h in parsed.hrefs) and len(parsed.hrefs) == 3
    assert (run / "report.pdf").read_bytes().startswith(b"%PDF")

    data = json.loads((run / "metrics.json").read_text())
    rows = data["rows"]
    assert len(rows) == 3  # one per record, metric rows merged in
    by_method = {r["method"]: r for r in rows}
    assert by_method["saliency"]["infidelity"] is None and by_method["layer_gradcam"]["infidelity"] == 0.5
    sal = by_method["saliency"]
    assert sal["roc_auc"] > 0.9 and sal["mass_inside"] > 3 * sal["mask_fraction"]
    assert "roc_auc" not in by_method["occlusion"]
    with open(run / "metrics.csv", newline="", encoding="utf-8") as fh:
        table = list(csv.DictReader(fh))
    assert list(table[0]) == data["columns"] and len(table) == len(rows)
    for crow, jrow in zip(table, rows):
        for col in data["columns"]:
            j = jrow.get(col)
            if j is None:
                assert crow[col] == ""
            elif isinstance(j, (int, float)) and not isinstance(j, bool):
                assert float(crow[col]) == pytest.approx(j)
            elif isinstance(j, str):
                assert crow[col] == j

    # Building again keeps one row per record (idempotent merge of the old metrics.json).
    build_report_from_run(run)
    assert len(json.loads((run / "metrics.json").read_text())["rows"]) == 3


def test_write_report_extra_tables_figures_and_nan(tmp_path):
    run = fake_run(tmp_path)
    fig = F.mip_figure(np.zeros((8, 8)), np.eye(8), run / "figs" / "a b.png")
    out = write_report(run, metrics=[{"method": "extra", "roc_auc": math.nan, "score": np.float32(2.5)}],
                       figures={"Sec <1>": [fig]}, extra_tables={"Curves": [{"name": "x", "auc": None}],
                                                                 "Info": {"k": "v & w"}})
    text = out.read_text(encoding="utf-8")
    parsed = parse_strict(text)
    assert parsed.alts == ["figs/a b.png"]
    assert base64.b64decode(parsed.srcs[0].split(",", 1)[1]) == (run / "figs" / "a b.png").read_bytes()
    assert "Sec &lt;1&gt;" in text and "v &amp; w" in text and text.count(">undefined</td>") >= 2
    rows = json.loads((run / "metrics.json").read_text())["rows"]
    assert rows[-1]["method"] == "extra" and rows[-1]["roc_auc"] is None and rows[-1]["score"] == 2.5


def test_report_errors(tmp_path):
    with pytest.raises(ConfigError, match="manifest.json"):
        build_report_from_run(tmp_path)
    run = fake_run(tmp_path)
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.uint8), AFFINE), tmp_path / "small.nii.gz")
    with pytest.raises(VolumeError, match=r"\(4, 4, 4\)"):
        build_report_from_run(run, mask=tmp_path / "small.nii.gz")
