"""napari settings the plugin writes once: NIfTI files open with this plugin's reader.

napari's own readers also claim ``.nii.gz`` (as a ``.gz`` file) and fail on
it, and with two readers drag-and-drop asks which one to use. npe2 manifests have no
reader priority, and napari only asks its ``plugins.extension2reader`` setting, so
``scripts/setup.sh napari`` runs this module once after installing, and the first
use of the plugin (a dock opened) runs it again; it writes napari's
*preferred reader* setting for ``*.nii`` and ``*.nii.gz`` — unless the user
already chose a reader for them, which is kept. The user can change it in
File ▸ Preferences ▸ Plugins ▸ File extension readers.
"""

from __future__ import annotations

PLUGIN = "napari-esegeta"
PATTERNS = ("*.nii", "*.nii.gz")


def ensure_preferred_reader() -> list[str]:
    """Make this plugin the preferred reader of NIfTI patterns nobody chose yet.

    Returns
    -------
    list of str
        The patterns set now (empty when all were already set, or napari's
        settings are unavailable).
    """
    try:
        from napari.settings import get_settings

        plugins = get_settings().plugins
        current = dict(plugins.extension2reader)
    except Exception:  # no settings (headless engine use): nothing to do
        return []
    missing = [p for p in PATTERNS if p not in current]
    if missing:
        plugins.extension2reader = {**current, **{p: PLUGIN for p in missing}}
    return missing


if __name__ == "__main__":  # python -m napari_esegeta._settings (scripts/setup.sh napari)
    done = ensure_preferred_reader()
    print(f"napari-esegeta: preferred reader of {', '.join(done)}" if done else
          "napari-esegeta: NIfTI readers already chosen in napari's settings (kept)")
