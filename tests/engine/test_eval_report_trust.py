"""A report you can send (issue 9, part 6): self-contained, a trust summary in words per
method, the randomisation numbers in sortable tables, a PDF, orientation letters."""

from __future__ import annotations

import base64
import re
import shutil
from html.parser import HTMLParser

import nibabel as nib
import numpy as np
import pytest
import torch

from esegeta_engine.config import parse_config
from esegeta_engine.evaluation import figures as F
from esegeta_engine.evaluation.trust import method_summaries, randomisation_tables
from esegeta_engine.pipeline import run

AFFINE = np.diag([-0.5, 0.5, 0.8, 1.0])  # x runs to the left: LAS


class Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[tuple[str, str]] = []

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k in ("src", "href", "data", "poster") or (k == "style" and "url(" in (v or "")):
                self.refs.append((tag, v or ""))


@pytest.fixture
def run_dir(tmp_path):
    from tiny_models import TinySegNet

    torch.manual_seed(0)
    model = TinySegNet(3)
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([0.0, 0.05]))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    vol = np.random.default_rng(0).random((8, 8, 8)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, AFFINE), tmp_path / "vol.nii.gz")
    cfg = parse_config({
        "model": {"path": "model.pt", "class_path": "tiny_models:TinySegNet", "kwargs": {"dims": 3}},
        "volumes": ["vol.nii.gz"], "target": {"classes": [1]},
        "methods": [{"name": "saliency"}, {"name": "integrated_gradients", "params": {"n_steps": 64}}],
        "output": {"dir": "out"},
        "evaluation": {"faithfulness": {"steps": 4}, "randomisation": {"max_stages": 2}, "report": True},
    }, base=tmp_path)
    return run(cfg).out_dir


def test_report_is_self_contained_with_trust_summary_and_randomisation_tables(run_dir, tmp_path):
    alone = tmp_path / "mailed"
    alone.mkdir()
    shutil.copy(run_dir / "report.html", alone / "report.html")
    text = (alone / "report.html").read_text(encoding="utf-8")
    parser = Refs()
    parser.feed(text)
    assert parser.refs and all(v.startswith("data:") for _, v in parser.refs), \
        [v[:40] for _, v in parser.refs if not v.startswith("data:")]
    images = [v for tag, v in parser.refs if tag == "img"]
    assert len(images) >= 5  # MIPs, montages, comparison, randomisation strip
    for v in images:
        assert base64.b64decode(v.split(",", 1)[1]).startswith(b"\x89PNG")
    assert "How far to trust each map" in text
    for method in ("saliency", "integrated_gradients"):
        assert re.search(rf"<b>{method}</b>[^<]*<span class=\"trust-(low|moderate|high|unchecked)\"", text)
    assert "completeness holds" in text  # IG with 64 steps on a ReLU net
    assert "Randomisation verdicts" in text and "Randomisation stages" in text
    for column in ("<th>null</th>", "<th>margin</th>", "<th>spearman_footprint</th>", "<th>reason</th>"):
        assert column in text
    assert (run_dir / "report.pdf").read_bytes()[:5] == b"%PDF-"


def test_summaries_and_tables_from_a_manifest() -> None:
    records = [{"status": "ok", "method": "integrated_gradients", "layer": None, "target": "argmax-1",
                "volume": "v", "metrics": {"axiom_status": "warning", "completeness_error": 0.9,
                                           "axiom_note": "fix: raise n_steps"}},
               {"status": "ok", "method": "saliency", "layer": None, "target": "argmax-1", "volume": "v",
                "metrics": {"axiom_status": "none", "roc_auc": 0.8}}]
    rnd = [{"volume": "v", "target": "argmax-1", "mode": "cascading", "stages": ["head"],
            "verdicts": {"saliency": {"passes": True, "verdict": "pass", "reason": "pass: mean 0.2",
                                      "mean_similarity": 0.2, "null": 0.1, "margin": 0.1}},
            "scores": {"saliency": {"head": {"spearman_abs": 0.2, "null": 0.1, "margin": 0.1}}}}]
    s = {x["method"]: x for x in method_summaries(records, rnd)}
    assert s["integrated_gradients"]["trust"] == "low" and "raise n_steps" in s["integrated_gradients"]["words"]
    assert s["saliency"]["trust"] == "high" and "ROC AUC 0.8" in s["saliency"]["words"]
    verdicts, stages = randomisation_tables(rnd)
    assert verdicts[0]["verdict"] == "pass" and verdicts[0]["null"] == 0.1
    assert stages[0]["stage"] == 1 and stages[0]["margin"] == 0.1


def test_orientation_letters_from_the_affine(tmp_path) -> None:
    assert F.axis_codes(np.diag([1.0, 1.0, 1.0, 1.0])) == ("R", "A", "S")
    codes = F.axis_codes(AFFINE)
    assert codes == ("L", "A", "S")
    views = {v["name"]: v["letters"] for v in F.display_views(np.zeros((6, 6, 6)), np.ones((6, 6, 6)), affine=AFFINE)}
    assert views["axial"] == {"left": "R", "right": "L", "top": "A", "bottom": "P"}  # radiological, as napari
    assert views["sagittal"] == {"left": "A", "right": "P", "top": "S", "bottom": "I"}
    assert F.axis_codes(None) is None and F.axis_codes(np.zeros((4, 4))) is None
    texts = []
    from matplotlib.axes import Axes

    real = Axes.text

    def spy(self, x, y, s, *args, **kwargs):
        texts.append(s)
        return real(self, x, y, s, *args, **kwargs)

    Axes.text = spy
    try:
        F.mip_figure(np.zeros((6, 6, 6)), np.ones((6, 6, 6)), tmp_path / "m.png", affine=AFFINE)
    finally:
        Axes.text = real
    assert sorted(texts) == sorted(["L", "R", "A", "P"] + ["A", "P", "S", "I"] + ["L", "R", "S", "I"])
