"""Fault injection for the real-process tests; it lives with the tests, never in the product.

A test puts ``tests/faults`` on ``PYTHONPATH``: every Python process it starts (the CLI, Ray's
workers, Tune's trials) then imports this module at start-up, which patches the product as it is
imported. The faults are read when they may fire, from the environment or, for processes started
long before the test (the nodes of a multi-node cluster), from the JSON file named by
``IWAE_TEST_CONTROL``; with neither, nothing happens:

- ``nan_epoch`` (``IWAE_TEST_NAN_EPOCH=e``): the parameters turn NaN before epoch e (0-based) is
  trained, so every step of that epoch is non-finite; with ``once_file`` (``IWAE_TEST_ONCE_FILE``)
  only the first process that gets there does (the file records that it fired).
- ``slow_score`` (``IWAE_TEST_SLOW_SCORE=s``): scoring a range of images sleeps s seconds first.
- ``slow_epoch`` (``IWAE_TEST_SLOW_EPOCH=s``): each epoch sleeps s seconds first; with ``slow_from``
  (``IWAE_TEST_SLOW_FROM=e``) only epochs e (0-based) and later do.
- ``compile_fail`` (``IWAE_TEST_COMPILE_FAIL=1``): what ``torch.compile`` returns raises when called,
  as on a machine without a working compiler.
"""

import importlib.abc
import importlib.util
import json
import os
import sys


def setting(name, default=None):
    """A fault's current setting: the environment first, then the control file."""
    value = os.environ.get(f"IWAE_TEST_{name.upper()}")
    if value is not None:
        return value
    control = os.environ.get("IWAE_TEST_CONTROL")
    if control:
        try:
            with open(control) as f:
                return json.load(f).get(name, default)
        except (OSError, ValueError):
            return default
    return default


def _fire_once() -> bool:
    once = setting("once_file")
    if not once:
        return True
    try:
        with open(once, "x"):
            return True
    except FileExistsError:
        return False


def _patch_train(mod):
    original = mod.Pack.train_epoch

    def train_epoch(self, *args, **kwargs):
        slow = float(setting("slow_epoch", 0) or 0)
        if slow and min(state.epoch for state in self.states) >= int(setting("slow_from", 0) or 0):
            import time

            time.sleep(slow)
        for g, state in enumerate(self.states):
            if state.epoch == int(setting("nan_epoch", -1)) and _fire_once():
                import torch

                with torch.no_grad():
                    self.flat[g].fill_(float("nan"))
        return original(self, *args, **kwargs)

    mod.Pack.train_epoch = train_epoch
    if setting("compile_fail"):

        def no_compiler(fn, *args, **kwargs):
            def call(*a, **k):
                raise RuntimeError("no C++ compiler here (a test's fault)")

            return call

        mod.torch.compile = no_compiler


def _patch_work(mod):
    original = mod.Scorer.score

    def score(self, span, *args, **kwargs):
        import time

        time.sleep(float(setting("slow_score", 0) or 0))
        return original(self, span, *args, **kwargs)

    mod.Scorer.score = score


PATCHES = {}
if any(k.startswith("IWAE_TEST_") for k in os.environ):
    PATCHES = {"iwae.pack": _patch_train, "pipeline.work": _patch_work}


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
