"""Shared set-up of the fault matrix (issue 10): a tiny model, a volume and a config on disk."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import yaml

AFFINE = np.array([[0.0, 0.0, -0.6, 40.0], [-0.4, 0.0, 0.0, 80.0], [0.0, 0.45, 0.0, -30.0], [0, 0, 0, 1.0]])
ENGINE_TESTS = Path(__file__).parent
SRC = ENGINE_TESTS.parent.parent / "src"
SLOW = {"class_path": "tiny_models:SlowSegNet", "kwargs": {"dims": 3, "delay": 0.01}}


def make_case(tmp_path: Path) -> Path:
    """``model.pt`` (TinySegNet state dict) and ``vol.nii.gz`` in ``tmp_path``."""
    from tiny_models import TinySegNet

    torch.manual_seed(0)
    model = TinySegNet(3)
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([0.0, 0.05]))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    vol = np.random.default_rng(0).random((8, 10, 6)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, AFFINE), tmp_path / "vol.nii.gz")
    return tmp_path


def config_dict(methods: list[dict[str, Any]] | None = None, **over: Any) -> dict[str, Any]:
    """A config mapping (paths relative to the case folder), ``over`` merged per section."""
    data: dict[str, Any] = {
        "model": {"path": "model.pt", "class_path": "tiny_models:TinySegNet", "kwargs": {"dims": 3}},
        "volumes": ["vol.nii.gz"],
        "target": {"kind": "argmax", "classes": [1]},
        "methods": methods or [{"name": "saliency"}],
        "output": {"dir": "out"},
    }
    for k, v in over.items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
    return data


def config(tmp_path: Path, methods: list[dict[str, Any]] | None = None, **over: Any) -> Any:
    """A validated :class:`~esegeta_engine.config.Config` for the case in ``tmp_path``."""
    from esegeta_engine.config import parse_config

    return parse_config(config_dict(methods, **over), base=tmp_path)


def write_config(tmp_path: Path, name: str = "c.yaml", methods: list[dict[str, Any]] | None = None,
                 **over: Any) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config_dict(methods, **over)))
    return path


def raw_nifti(path: Path, shape: tuple[int, ...], affine: np.ndarray, data: bytes | None = None,
              dtype: int = 16) -> Path:
    """Write a NIfTI-1 file byte by byte (header fields as given, not as nibabel would fix them).

    ``dtype`` is the NIfTI datatype code (16: float32); ``data`` defaults to zeros for the
    claimed shape. A ``.gz`` name is gzip-compressed.
    """
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr["datatype"] = dtype
    hdr["bitpix"] = 32
    hdr["vox_offset"] = 352
    hdr["sform_code"], hdr["qform_code"] = 1, 0
    hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = affine[0], affine[1], affine[2]
    hdr["pixdim"][1:4] = 1.0
    if data is None:
        data = np.zeros(shape, np.float32).tobytes(order="F")
    blob = hdr.binaryblock + b"\0" * 4 + data
    path.write_bytes(gzip.compress(blob) if path.name.endswith(".gz") else blob)
    return path


def cli(args: list[str], cwd: Path, **kw: Any) -> subprocess.Popen:
    """Start ``esegeta ARGS`` in a subprocess using this checkout's sources."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(ENGINE_TESTS)]), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "esegeta_engine.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def one_error_line(err: str) -> str:
    """The CLI's error message: exactly one ``error:`` line holding the problem and the fix."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "; fix: " in lines[0], err
    return lines[0]
