"""Helpers shared by the plugin tests."""

from __future__ import annotations

import time

import numpy as np


def wait_until(qtbot, condition, timeout: float = 30.0) -> float:
    """Process Qt events until ``condition()`` holds; returns the seconds waited."""
    start = time.perf_counter()
    qtbot.waitUntil(condition, timeout=int(timeout * 1000))
    return time.perf_counter() - start


def layer_world_of_voxel(layer, ijk) -> np.ndarray:
    """World coordinates napari gives a voxel index of ``layer``."""
    return np.asarray(layer.data_to_world(np.asarray(ijk, dtype=float)))
