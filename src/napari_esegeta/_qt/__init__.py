"""Qt dock widgets of napari-esegeta (thin: the logic lives in the plain modules)."""
