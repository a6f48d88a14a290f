#!/usr/bin/env bash
# Set up napari-esegeta in ./.venv.
#
#   bash scripts/setup.sh          engine + CLI (enough for `esegeta demo`)
#   bash scripts/setup.sh napari   + the napari plugin and PyQt6
#   bash scripts/setup.sh test     + test tools, and (as root, through apt) Xvfb and Mesa
#
# torch is installed first and pinned, so nothing later upgrades it. The default is
# the CPU build torch==2.13.0; GPU users choose their build, e.g.
#   ESEGETA_TORCH="torch==2.13.0" ESEGETA_TORCH_INDEX=https://download.pytorch.org/whl/cu128 bash scripts/setup.sh
set -euo pipefail
mode="${1:-core}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
torch_spec="${ESEGETA_TORCH:-torch==2.13.0}"

if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)

# numpy first: importing a torch wheel without numpy warns ("Failed to initialize NumPy")
if ! .venv/bin/python -c "import numpy" 2>/dev/null; then
  "${pip[@]}" numpy
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: installing $torch_spec" >&2
  if [ -n "${ESEGETA_TORCH_INDEX:-}" ]; then
    "${pip[@]}" "$torch_spec" --index-url "$ESEGETA_TORCH_INDEX"
  else
    "${pip[@]}" "$torch_spec"
  fi
fi
# Keep whatever torch is installed now: later installs must not replace it.
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
.venv/bin/python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$constraints"

case "$mode" in
  core)   extras="" ;;
  napari) extras="[napari,qt]" ;;
  test)   extras="[all]" ;;
  *) echo "usage: bash scripts/setup.sh [core|napari|test]" >&2; exit 2 ;;
esac
echo "setup: installing napari-esegeta$extras" >&2
"${pip[@]}" -c "$constraints" -e ".$extras"
if [ "$mode" = napari ]; then  # npe2 has no install-time reader priority: write napari's preferred reader now
  .venv/bin/python -m napari_esegeta._settings >&2 || true
fi

if [ "$mode" = test ] && ! command -v xvfb-run >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Xvfb and Mesa (apt)" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      xvfb xauth libgl1 libgl1-mesa-dri libegl1 libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0 \
      libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 libxcb-xfixes0 \
      libxcb-shape0 libxcb-cursor0 libdbus-1-3 libfontconfig1 libglib2.0-0 >/dev/null
  else
    echo "setup: xvfb-run is missing; install Xvfb and Mesa (e.g. apt-get install xvfb libgl1-mesa-dri)" >&2
    exit 1
  fi
fi
echo "setup: done ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))" >&2
