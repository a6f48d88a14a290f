"""A result layer carries its map's trust scorecard and, for one structure, the component's record."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from esegeta_engine.config import EvaluationConfig, MethodConfig, PreprocessConfig, TargetConfig
from esegeta_engine.evaluation.evaluators import make_evaluators
from esegeta_engine.evaluation.trust import SCORECARD
from esegeta_engine.explain import Explainer, MapReady
from esegeta_engine.io import Volume


def test_layer_metadata_has_the_scorecard_and_the_component():
    from napari_esegeta._run import map_layer_data
    from test_regions import Blur, three_structures  # tests/engine is on the path (conftest)

    img = three_structures(3)
    img[:3, :3, 1:4] = 1.0
    target = TargetConfig(kind="argmax", classes=[1], components=True, activation="softmax")
    ex = Explainer(Blur(3), preprocess=PreprocessConfig(), target=target)
    cfg = EvaluationConfig(road={"percentages": [0.5]})
    ready = [e for e in ex.iter_explain([Volume(img, np.eye(4))], [MethodConfig(name="saliency")],
                                        evaluators=make_evaluators(cfg), threaded=False) if isinstance(e, MapReady)]
    layer = SimpleNamespace(name="input", metadata={}, scale=(1, 1, 1), translate=(0, 0, 0), rotate=np.eye(3),
                            shear=(0, 0, 0), affine=SimpleNamespace(affine_matrix=np.eye(4)))
    _, kwargs, _ = map_layer_data(ready[0], layer, target)
    meta = kwargs["metadata"]["esegeta"]
    assert set(SCORECARD) <= set(meta["trust"]) and meta["trust"]["faithfulness"]["status"] != "not checked"
    assert meta["target_details"]["component"] == 1 and len(meta["target_details"]["centroid_mm"]) == 3
    assert "component-01" in kwargs["name"]
