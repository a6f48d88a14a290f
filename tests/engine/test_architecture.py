"""The engine never imports GUI code (also enforced by import-linter in scripts/test.sh)."""

from __future__ import annotations

import subprocess
import sys


def test_engine_imports_no_gui_modules():
    code = (
        "import sys, pkgutil, importlib, esegeta_engine\n"
        "for m in pkgutil.walk_packages(esegeta_engine.__path__, 'esegeta_engine.'):\n"
        "    if not m.name.endswith('.train'): importlib.import_module(m.name)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('napari', 'qtpy', 'magicgui', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'napari_esegeta', 'vispy')]\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
