#!/usr/bin/env bash
# Run the whole test suite (engine + napari plugin under a virtual X server)
# and the import contract that keeps the engine GUI-free. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
.venv/bin/lint-imports
export QT_API=pyqt6
exec xvfb-run -a -s "-screen 0 1600x1200x24" .venv/bin/python -m pytest "$@"
