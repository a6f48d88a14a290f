"""NIfTI files open with this plugin's reader without a dock ever shown (issue 19.9): ``scripts/setup.sh napari``
runs ``python -m napari_esegeta._settings``, which writes napari's preferred reader; a fresh napari then
opens a ``.nii.gz`` with ``plugin=None`` instead of raising ``MultipleReaderError``."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

OPEN = """
import sys
from napari.components import ViewerModel
from napari.plugins import _initialize_plugins
from napari.settings import get_settings
_initialize_plugins()  # what napari.Viewer() does: discover the installed plugins
print(dict(get_settings().plugins.extension2reader))
layers = ViewerModel().open(sys.argv[1], plugin=None)
print("OPENED", layers[0].name, layers[0].metadata["nifti"]["affine"][0][0])
"""


def _run(args, env):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300)


def test_setup_writes_the_preferred_reader(tmp_path) -> None:
    import nibabel as nib

    path = tmp_path / "scan.nii.gz"
    affine = np.diag([-2.0, 1.0, 1.0, 1.0])
    nib.save(nib.Nifti1Image(np.arange(60, dtype=np.float32).reshape(3, 4, 5), affine), path)
    env = {**os.environ, "NAPARI_CONFIG": str(tmp_path / "napari" / "settings.yaml")}
    before = _run(["-c", OPEN, str(path)], env)
    assert "MultipleReaderError" in before.stderr  # a fresh napari cannot choose
    done = _run(["-m", "napari_esegeta._settings"], env)
    assert done.returncode == 0 and "preferred reader of *.nii, *.nii.gz" in done.stdout, done.stderr
    after = _run(["-c", OPEN, str(path)], env)
    assert after.returncode == 0, after.stderr[-2000:]
    assert "OPENED scan -2.0" in after.stdout  # this plugin's reader: the layer keeps the NIfTI affine
    again = _run(["-m", "napari_esegeta._settings"], env)
    assert "already chosen" in again.stdout  # a choice is kept, never overwritten
