"""The forward floor: how the network is called, below the methods.

- :mod:`~esegeta_engine.forward.runner`: execution forms (whole volume, sliding window,
  padding, precision) between the user's network and the target.
- :mod:`~esegeta_engine.forward.sliding`: MONAI-equal sliding windows with patch-wise
  gradients and patch reuse.
- :mod:`~esegeta_engine.forward.scoring`: the score model (network -> output -> target
  scores) and the evaluation monitor (counting, cancel, deadline).

Nothing here imports the methods or the job floor above them (an import-linter
``layers`` contract checks it).
"""
