"""The report's statistics: paired differences on shared images, pooling over seeds, Student's t.

Every comparison of two runs is paired per image on the images both scored (the same images,
binarised alike, so image-to-image variation cancels). A gain pooled over seeds uses only the images
every pooled run shares: each such image's gain is averaged over the seeds, and its standard error
is taken over images; the per-seed gains (on the same images) give the spread across seeds, and a
Student-t interval with (seeds - 1) degrees of freedom (scipy) says whether that spread leaves the
sign open.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats


def t975(dof: int) -> float:
    """The two-sided 95% quantile of Student's t with ``dof`` degrees of freedom (``t.ppf(0.975, dof)``)."""
    return float(stats.t.ppf(0.975, dof))


def se(x: pd.Series) -> float:
    """Standard error of the mean (sample sd / sqrt(n)); NaN below two values."""
    x = x.dropna()
    return float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else math.nan


@dataclass(frozen=True)
class Paired:
    """Mean and standard error of ``b - a`` over the ``n`` images both have."""

    mean: float
    se: float
    n: int


def paired(a: pd.Series, b: pd.Series) -> Paired:
    """``b - a`` per image (both indexed by image id), on the images both scored."""
    d = (b - a).dropna()
    if len(d) < 2:
        return Paired(math.nan, math.nan, len(d))
    return Paired(float(d.mean()), se(d), len(d))


def shared_images(series: list[pd.Series]) -> pd.Index:
    """The image ids every series has a value for."""
    if not series:
        return pd.Index([])
    return functools.reduce(lambda ix, s: ix.intersection(s.dropna().index), series[1:], series[0].dropna().index)


@dataclass(frozen=True)
class Pooled:
    """A gain pooled over seeds on the images every pooled run shares (module docstring)."""

    mean: float  # mean over the shared images of each image's gain averaged over the seeds
    se: float  # its standard error over images
    images: int  # the shared images
    per_seed: tuple[float, ...]  # each seed's mean gain on the shared images
    half_width: float  # the 95% Student-t half-width of the mean of per_seed (NaN with one seed)

    @property
    def seeds(self) -> int:
        return len(self.per_seed)


def pooled(pairs: list[tuple[pd.Series, pd.Series]]) -> Pooled:
    """Pool ``b - a`` over seeds (one ``(a, b)`` pair of per-image series per seed) on shared images."""
    ids = shared_images([s for pair in pairs for s in pair])
    if len(ids) < 2 or not pairs:
        return Pooled(math.nan, math.nan, len(ids), (), math.nan)
    gains = pd.concat([(b.reindex(ids) - a.reindex(ids)) for a, b in pairs], axis=1)  # (images, seeds)
    per_image = gains.mean(axis=1)
    per_seed = tuple(float(v) for v in gains.mean(axis=0))
    n = len(per_seed)
    half = t975(n - 1) * float(np.std(per_seed, ddof=1)) / math.sqrt(n) if n > 1 else math.nan
    return Pooled(float(per_image.mean()), se(per_image), len(ids), per_seed, half)
