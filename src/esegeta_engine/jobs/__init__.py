"""The job floor: what to compute and how jobs run, above the methods.

- :mod:`~esegeta_engine.jobs.plan`: jobs, stable keys, expected evaluations (pure).
- :mod:`~esegeta_engine.jobs.executor`: one job -> its events (map, failure).
- :mod:`~esegeta_engine.jobs.resume`: which finished outputs a resumed run keeps.
- :mod:`~esegeta_engine.jobs.events`, :mod:`~esegeta_engine.jobs.build`: run events;
  targets on the model grid and readable out-of-memory errors.
"""
