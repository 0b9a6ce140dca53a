"""pipeline: orchestration of iwae on Ray (training and evaluation as Ray tasks on one executor, Parquet, jobs, reports).

It never computes a bound itself: all the science is in :mod:`iwae`.
"""

__version__ = "0.1.0"
