"""Execution: plan keyed jobs, run each on one device through one score-model factory.

- :mod:`~esegeta_engine.execution.plan`: jobs, stable keys, expected evaluations (pure).
- :mod:`~esegeta_engine.execution.executor`: one job -> its events (map, failure).
- :mod:`~esegeta_engine.execution.runner`: execution forms (whole volume, sliding window,
  padding, precision) between the user's network and the target.
- :mod:`~esegeta_engine.execution.sliding`: MONAI-equal sliding windows with patch-wise
  gradients and patch reuse.
- :mod:`~esegeta_engine.execution.resume`: which finished outputs a resumed run keeps.
- :mod:`~esegeta_engine.execution.events`, :mod:`~esegeta_engine.execution.build`: run events;
  targets on the model grid and readable out-of-memory errors.
"""
