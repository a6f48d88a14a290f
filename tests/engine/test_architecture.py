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


def test_floors_do_not_look_up():
    """import-linter's contracts hold: no GUI in the engine; jobs above methods above the forward layer."""
    import shutil
    from pathlib import Path

    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([exe, "--config", str(root / "pyproject.toml")], capture_output=True, text=True,
                          cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "Floors that do not look up" in proc.stdout and "KEPT" in proc.stdout


def test_forward_layer_imports_nothing_above_it():
    """Importing the forward layer loads neither the methods nor the job layer."""
    code = ("import sys, esegeta_engine.forward.scoring, esegeta_engine.forward.sliding\n"
            "bad = [m for m in sys.modules if m.startswith(('esegeta_engine.methods', 'esegeta_engine.jobs', "
            "'esegeta_engine.explain', 'esegeta_engine.pipeline'))]\n"
            "print(bad); sys.exit(1 if bad else 0)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_command_line_parser_imports_no_heavy_module():
    """`esegeta --help` answers without importing torch, Captum or MONAI (they load with the commands)."""
    code = ("import sys, contextlib, io\n"
            "from esegeta_engine.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n"
            "        main(['--help'])\n"
            "    except SystemExit:\n"
            "        pass\n"
            "heavy = [m for m in ('torch', 'captum', 'monai', 'nibabel', 'scipy') if m in sys.modules]\n"
            "print(heavy); sys.exit(1 if heavy else 0)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
