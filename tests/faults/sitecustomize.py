"""Fault injection for the real-process tests; it lives with the tests, never in the product.

A test puts ``tests/faults`` on ``PYTHONPATH``: every Python process it starts (the CLI, Ray's
workers, Tune's trials) then imports this module at start-up, which patches the product as it is
imported, driven by these variables (all unset: nothing happens):

- ``IWAE_TEST_NAN_EPOCH=e``: the parameters turn NaN before epoch e (0-based) is trained, so every
  step of that epoch is non-finite; with ``IWAE_TEST_ONCE_FILE=path`` only the first process that
  gets there does (the file records that it fired).
- ``IWAE_TEST_SLOW_SCORE=s``: scoring a shard sleeps s seconds first (a window to kill a worker).
"""

import importlib.abc
import importlib.util
import os
import sys


def _fire_once() -> bool:
    once = os.environ.get("IWAE_TEST_ONCE_FILE")
    if not once:
        return True
    try:
        with open(once, "x"):
            return True
    except FileExistsError:
        return False


def _patch_train(mod):
    epoch = int(os.environ.get("IWAE_TEST_NAN_EPOCH", "-1"))
    original = mod.train_epoch

    def train_epoch(state, *args, **kwargs):
        if state.epoch == epoch and _fire_once():
            import torch

            with torch.no_grad():
                for p in state.model.parameters():
                    p.fill_(float("nan"))
        return original(state, *args, **kwargs)

    mod.train_epoch = train_epoch


def _patch_work(mod):
    delay = float(os.environ.get("IWAE_TEST_SLOW_SCORE", "0"))
    original = mod.ShardScorer.score

    def score(self, run_id, shard):
        import time

        time.sleep(delay)
        return original(self, run_id, shard)

    mod.ShardScorer.score = score


PATCHES = {}
if os.environ.get("IWAE_TEST_NAN_EPOCH"):
    PATCHES["iwae.train"] = _patch_train
if os.environ.get("IWAE_TEST_SLOW_SCORE"):
    PATCHES["pipeline.work"] = _patch_work


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the real loader of a patched module to patch it once loaded."""

    def find_spec(self, name, path, target=None):
        if name not in PATCHES:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def patched(module):
            exec_module(module)
            PATCHES[name](module)

        spec.loader.exec_module = patched
        return spec


if PATCHES:
    sys.meta_path.insert(0, _AfterImport())
