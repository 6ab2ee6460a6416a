"""Sweeps: ``ftdist tune SPEC`` on Ray Tune, as one package.

- :mod:`~ftdist.sweep.spec`    the sweep spec schema and its resolution against the base config (pure)
- :mod:`~ftdist.sweep.space`   spec -> Tune search space, searcher, scheduler, trial resources (pure)
- :mod:`~ftdist.sweep.asha`    ASHA whose rung records survive a driver restart
- :mod:`~ftdist.sweep.layout`  the sweep folder's file names and segment run folders
- :mod:`~ftdist.sweep.trial`   one trial: the Tune function trainable running Train runs
- :mod:`~ftdist.sweep.driver`  the driver: checks, concurrency, the Tuner, progress
- :mod:`~ftdist.sweep.report`  the sweep's outputs: table, best model, plots

One rule keeps it layered: nothing imports the driver but the CLI (and the benchmark that runs
sweeps); the driver imports everything else here.
"""
