"""The plugin's result layers carry the engine's map record (the manifest's shape), read back with MapRecord."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import torch

from esegeta_engine.config import MethodConfig, PreprocessConfig, TargetConfig
from esegeta_engine.explain import MapReady
from esegeta_engine.io import Volume
from esegeta_engine.jobs.record import MapRecord
from napari_esegeta._run import explain_events, map_layer_data

from tiny_models import TinySegNet


def test_layer_metadata_holds_the_map_record() -> None:
    torch.manual_seed(0)
    net = TinySegNet(3).eval()
    volume = Volume(np.random.default_rng(0).random((8, 8, 8)).astype(np.float32), np.eye(4))
    target = TargetConfig(kind="argmax", classes=[1])
    events = list(explain_events(net, volume, [MethodConfig(name="saliency")], preprocess=PreprocessConfig(),
                                 target=target, output=None, roi_mask=None, cancel=threading.Event()))
    ready = [e for e in events if isinstance(e, MapReady)]
    layer = SimpleNamespace(name="input", metadata={}, scale=(1, 1, 1), translate=(0, 0, 0), rotate=np.eye(3),
                            shear=(0, 0, 0), affine=SimpleNamespace(affine_matrix=np.eye(4)))
    _, kwargs, _ = map_layer_data(ready[0], layer, target)
    rec = MapRecord.from_json(kwargs["metadata"]["esegeta"]["record"])
    job = ready[0].job
    assert (rec.key, rec.method, rec.cls, rec.target, rec.status) == (job.key, "saliency", 1, job.cls_label, "ok")
    assert len(rec.key) == 64 and rec.model_evaluations == ready[0].evaluations == 1
