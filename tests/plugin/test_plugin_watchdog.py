"""The Explain tab's engine call honours --timeout: a forward that never returns is abandoned."""

from __future__ import annotations

import numpy as np
import nibabel as nib
import pytest
import torch

import stuck_models
from esegeta_engine import watchdog
from esegeta_engine.explain import JobFailed


@pytest.fixture
def case(tmp_path):
    stuck_models.reset()
    torch.manual_seed(0)
    vol = np.random.default_rng(0).random((8, 10, 6)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.diag([0.8, 0.8, 1.5, 1.0])), tmp_path / "vol.nii.gz")
    yield tmp_path
    stuck_models.RELEASE.set()


@pytest.mark.timeout(300)
def test_the_napari_worker_path_abandons_a_stuck_forward_too(case, monkeypatch):
    import threading

    from napari_esegeta._run import explain_events

    from esegeta_engine.config import MethodConfig, PreprocessConfig, TargetConfig
    from esegeta_engine.explain import MapReady
    from esegeta_engine.io import load_volume

    monkeypatch.setattr(watchdog, "grace_s", lambda timeout_s: 0.2)
    model = stuck_models.StuckOnGradSegNet(3).eval()
    events = list(explain_events(model, load_volume(case / "vol.nii.gz"),
                                 [MethodConfig(name="saliency"), MethodConfig(name="occlusion", params={"window": 4})],
                                 preprocess=PreprocessConfig(), target=TargetConfig(kind="argmax", classes=[1]),
                                 output=None, roi_mask=None, cancel=threading.Event(), timeout_s=1.0))
    failed = [e for e in events if isinstance(e, JobFailed)]
    ready = [e for e in events if isinstance(e, MapReady)]
    assert [(e.job.spec.name, e.status) for e in failed] == [("saliency", "timeout")] and "abandoned" in failed[0].error
    assert [e.job.spec.name for e in ready] == ["occlusion"]
