"""pipeline: orchestration of iwae on Ray (sweeps on Tune, sharded evaluation, Parquet, jobs, reports).

It never computes a bound itself: all the science is in :mod:`iwae`.
"""

__version__ = "0.1.0"
