"""Shared fixtures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "engine"))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def nnunet_folder(tmp_path_factory):
    """A tiny nnU-Net v2 results folder (folds 0 and 1) built with nnU-Net's own tools, once per session."""
    pytest.importorskip("nnunetv2")
    import nnunet_setup

    return nnunet_setup.make_results(tmp_path_factory.mktemp("nnunet"), folds=(0, 1))
