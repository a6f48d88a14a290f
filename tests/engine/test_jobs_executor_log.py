"""The log line of a finished job counts the evaluations its record and the tables show (issue 19.9): the
trust checks' own forward passes are said apart, not added in."""

from __future__ import annotations

import logging
import re

import numpy as np
import torch
from torch import nn

from esegeta_engine.config import MethodConfig, PreprocessConfig, TargetConfig
from esegeta_engine.evaluation.evaluators import axiom_evaluator
from esegeta_engine.explain import Explainer, MapReady
from esegeta_engine.io import Volume


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_log_counts_what_the_record_counts(caplog) -> None:
    torch.manual_seed(0)
    ex = Explainer(Net().eval(), PreprocessConfig(), TargetConfig(classes=[1]))
    vol = Volume(np.random.default_rng(0).random((8, 8, 8)).astype(np.float32), np.eye(4))
    with caplog.at_level(logging.INFO, logger="esegeta_engine"):
        events = list(ex.iter_explain([vol], [MethodConfig(name="integrated_gradients", params={"n_steps": 4})],
                                      evaluators=[axiom_evaluator()], threaded=False))
    ready = [e for e in events if isinstance(e, MapReady)]
    assert len(ready) == 1
    line = next(r.getMessage() for r in caplog.records if "done in" in r.getMessage())
    logged = int(re.search(r"(\d+) model evaluations", line).group(1))
    assert logged == ready[0].evaluations
    checks = re.search(r"\+(\d+) for its checks", line)
    assert checks is not None and int(checks.group(1)) >= 1  # the completeness check's F(x), F(x0)
