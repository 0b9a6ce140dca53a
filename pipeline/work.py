"""Units of work, free of Ray: train runs, score ranges of images. The executor's Ray tasks and the
in-process commands call these.

They call into :mod:`iwae` for the science and read and write through :class:`pipeline.store.results.Results`
(a local folder or object storage) and :class:`pipeline.datasource.DataSource`, objects that the
command made once and that pickle as their locations, so they run the same on any node. They are
idempotent: a finished run (by :class:`pipeline.store.ledger.RunLedger`) or a written range is never
redone, so retries and re-runs are safe.

A scoring unit writes each range it scores through the one writer, which checks it and writes it
whole (:meth:`pipeline.store.ledger.EstimateLedger.write`); the driver only records how many. Every
image's numbers are seeded by its id, so an image is counted once whichever worker or node
computed it, died or retried. A training unit holds its runs' leases itself (:mod:`pipeline.store.leases`).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import shlex
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from iwae import checkpoint
from iwae.config import RunConfig
from iwae.data import Dataset
from iwae.evaluate import binarize_by_id, estimate_log_px
from iwae.latent import LatentModel
from iwae.models import IWAEModel
from iwae.pack import train_pack
from iwae.state import Heartbeat, Stopped, TrainResult, model_from_checkpoint, pick_device
from iwae.units import PrunedOnCommonDraws, active_masks, unit_variances
from pipeline.datasource import DataSource
from pipeline.errors import RunFailed, UserError
from pipeline.store.estimates import AISPlan, EvalPlan, Span
from pipeline.store.leases import Held, Lease, LeaseLost, Leases
from pipeline.store.ledger import EstimateLedger, RunLedger, RunState, load_final, run_state
from pipeline.store.results import AIS_SCHEMA, EVAL_SCHEMA, PREFIXES, Results, rows_table, versions


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------- training


class StoreCheckpoints:
    """A run's checkpoints in the results store (``runs/<run_id>/*.pt``), on any node."""

    def __init__(self, results: Results, run_id: str):
        self.store, self.prefix = results.store, results.checkpoint_key(run_id)

    def read(self, name: str) -> bytes | None:
        try:
            return self.store.read_bytes(f"{self.prefix}/{name}")
        except FileNotFoundError:
            return None

    def write(self, name: str, data: bytes) -> None:
        self.store.write_bytes(f"{self.prefix}/{name}", data)

    def names(self) -> list[str]:
        return [k.rsplit("/", 1)[-1] for k in self.store.list(self.prefix, ".pt")]

    def quarantine(self, name: str) -> None:
        self.store.quarantine(f"{self.prefix}/{name}")


def init_checkpoint(results: Results, cfg: RunConfig) -> dict[str, Any] | None:
    """The final checkpoint of ``cfg.init_from`` (Table 2 starts from Table 1's models)."""
    if not cfg.init_from:
        return None
    try:
        return load_final(results, cfg.init_from)
    except checkpoint.CheckpointError:
        raise UserError(f"run {cfg.init_from} (the starting point of {cfg.run_id}) is not trained; run its job first (see `iwae-pipeline jobs`)") from None


def train_members(
    cfgs: Sequence[RunConfig],
    results: Results,
    data: DataSource,
    *,
    on_epoch: Callable[[RunConfig, dict[str, Any]], None] | None = None,
    dataset: Dataset | None = None,
    compile_step: bool | str = "auto",
    progress: bool = False,
    notice: Callable[[str], None] | None = None,
    heartbeat: Heartbeat | None = None,
    raise_failed: bool = True,
) -> list[dict[str, Any]]:
    """Train the runs of ``cfgs`` that are not done yet (runs of one :func:`iwae.pack.pack_key`, or one
    run: a task of the executor, or a pack of ``train``) as one pack (:func:`iwae.pack.train_pack`,
    the one training loop), write each run's rows, and return every run's row in order.

    A pack of several runs names them in each run's ``pack`` column. A member that diverged gets a
    ``failed`` row (the others are kept) and :class:`RunFailed` names it at the end, in one line; with
    ``raise_failed=False`` (the executor's task) its failed row is returned in its place instead.
    """
    ledger = RunLedger.read(results, [c.run_id for c in cfgs], by_listing=False)  # a retried task finds what it finished
    rows = {c.run_id: dict(ledger.row(c.run_id) or {}) for c in cfgs if ledger.done(c.run_id)}
    todo = ledger.todo(cfgs)
    if not todo:
        return [rows[c.run_id] for c in cfgs]
    ds = dataset or data.load(todo[0].dataset, todo[0].split)
    dev = pick_device()
    inits = [init_checkpoint(results, c) for c in todo]
    sinks: list[checkpoint.Checkpoints | None] = [StoreCheckpoints(results, c.run_id) for c in todo]
    pack_hook = (lambda g, row: on_epoch(todo[g], row)) if on_epoch is not None else None
    out = train_pack(
        todo, ds, sinks, device=dev, inits=inits, on_epoch=pack_hook, compile_step=compile_step, progress=progress, notice=notice, heartbeat=heartbeat
    )
    pack = "+".join(c.run_id for c in todo) if len(todo) > 1 else ""
    failed = []
    for c, r in zip(todo, out):
        if heartbeat is not None:
            heartbeat.check()  # still this task's runs: before their rows are written
            heartbeat.beat()
        if isinstance(r, TrainResult):
            rows[c.run_id] = record_run(c, results, r, ds, dev, pack)
        else:
            rows[c.run_id] = mark_failed(results, c, str(r)) or {"run_id": c.run_id, "status": "failed", "error": str(r)}
            failed.append(f"{c.run_id} ({r})")
    if failed and raise_failed:
        kept = "; the others are kept" if len(todo) > 1 else ""
        why = f"{len(failed)} of {len(todo)} runs failed: {'; '.join(failed)}{kept}"
        raise RunFailed(f"{why}; their last checkpoints are kept, run the same command again to retry")
    return [rows[c.run_id] for c in cfgs]


STARTUP_S = float(os.environ.get("IWAE_STARTUP_SECONDS", "900"))  # a task's leases are renewed without a step for this long at its start


def train_unit(
    results: Results, data: DataSource, cfgs: Sequence[dict[str, Any]], token: str, command: str = "", compile_step: bool | str = "auto"
) -> dict[str, Any]:
    """A unit of the executor: train one pack (the runs ``cfgs``, as dicts) on whichever node runs it,
    under the runs' leases, which this task takes (as holder ``token``), renews and releases.

    A member whose lease another holds live is not trained here: it comes back in ``held`` (run id ->
    holder), for the driver to look at again later. The leases are renewed from a thread of this task
    every third of their length, and only while training makes progress (its steps advance between
    two renewals, :class:`iwae.state.Heartbeat`): a hung loop lets them expire, and another command
    takes the runs over. If another has taken one over, training stops before its next checkpoint
    and the reason comes back in ``lost``. The task's warnings and notices (a CUDA graph capture or a
    torch.compile that failed, a resume on another device with reseeded draws) come back in
    ``notes``, for the driver's console. Returns ``{"rows": [...], "held": {...}, "lost": str, "notes": [...]}``."""
    import threading

    why = usable_on_this_node(results, command)  # a node that joined after the driver's storage check (an autoscaler's) is checked here
    if why:
        import socket

        raise UserError(f"node {socket.gethostname()} cannot use {results} ({why}); {results.storage_fix()}")
    configs = [RunConfig.from_dict(d) for d in cfgs]
    book = Leases(results, token, command=command)
    leases: dict[str, Lease] = {}
    held: dict[str, str] = {}
    epochs: dict[str, int] = {}  # the epoch each run reached: what its lease records
    out: dict[str, Any] = {"rows": [], "held": held, "lost": ""}
    try:
        for c in configs:
            got = book.acquire(c.run_id)
            if isinstance(got, Held):
                held[c.run_id] = got.by
            else:
                leases[c.run_id] = got
        mine = [c for c in configs if c.run_id in leases]
        if not mine:
            return out
        beat = Heartbeat(guard=lambda: book.check_held(list(leases.values())))  # before each checkpoint and row: still ours (one HEAD a run)
        stop = threading.Event()
        started = time.monotonic()

        def renew() -> None:
            last, renewed = -1, time.monotonic()
            while not stop.wait(book.seconds / 3):
                starting = beat.beats == 0 and time.monotonic() - started < STARTUP_S  # data, checkpoints, compile or graph capture before the first step
                if beat.beats == last and not starting:
                    continue  # no step since the last renewal: the loop may hang, so the lease is left to run out
                last = beat.beats
                try:
                    for rid, lease in leases.items():
                        book.renew(lease, epochs.get(rid), deadline_s=book.seconds / 6)
                    renewed = time.monotonic()
                except LeaseLost as e:
                    beat.stop(str(e))
                    return
                except OSError:  # the store kept failing: tried again next time, unless the lease may have run out meanwhile
                    if time.monotonic() - renewed > 0.8 * book.seconds:
                        gone = time.monotonic() - renewed
                        beat.stop(f"its leases could not be renewed for {gone:.0f} s (the store kept failing); another command may take the runs over")
                        return

        def on_epoch(cfg: RunConfig, row: dict[str, Any]) -> None:
            epochs[cfg.run_id] = int(row["epoch"])

        renewer = threading.Thread(target=renew, daemon=True, name="lease-renewal")
        renewer.start()
        notes: list[str] = []
        out["notes"] = notes
        try:
            with warnings.catch_warnings(record=True) as caught:  # Ray shows a worker's stderr nowhere: they go back to the driver
                warnings.simplefilter("always")
                try:
                    out["rows"] = train_members(
                        mine, results, data, on_epoch=on_epoch, compile_step=compile_step, heartbeat=beat, notice=notes.append, raise_failed=False
                    )
                finally:
                    notes += [f"{type(w.message).__name__}: {w.message}" if not isinstance(w.message, UserWarning) else str(w.message) for w in caught]
        except Stopped as e:  # another command trains these runs now: not a failure of this one
            out["lost"] = str(e)
        finally:
            stop.set()
        return out
    finally:
        for rid, lease in leases.items():
            try:
                book.release(lease, epochs.get(rid))
            except OSError:
                pass  # it expires on its own


def usable_on_this_node(results: Results, command: str) -> str:
    """:meth:`Results.usable_here`, asked once per node and command (5 requests): the first task of
    a command on a node checks, and leaves a mark in the node's own cache folder (where its data
    cache is: :func:`pipeline.datasource.node_cache_dir`) that the command's later tasks there read
    instead. "" when usable, else why not."""
    import hashlib

    from pipeline.datasource import node_cache_dir

    mark = node_cache_dir() / "usable" / hashlib.sha256(f"{results.store.uri()}|{command}".encode()).hexdigest()[:24]
    if command and mark.exists():
        return ""
    why = results.usable_here()
    if not why and command:
        try:
            mark.parent.mkdir(parents=True, exist_ok=True)
            mark.touch()
        except OSError:
            pass  # checked again by the next task
    return why


def score_unit(ledger: EstimateLedger, data: DataSource, spans: Sequence[Span]) -> int:
    """A unit of the executor: score ranges of one run with this process's cached scorer (its model
    loaded once) and write each one as it is done; returns the rows written."""
    sc = scorer(ledger, data)
    written = ledger.written(spans[0].run_id) if len(spans) > 1 else set()  # a retried unit: the ranges it wrote before (one listing)
    return sum(ledger.write(span, sc.score(span)) for span in spans if span.name not in written)


def train_in_process(
    cfgs: Sequence[RunConfig],
    results: Results,
    data: DataSource,
    *,
    pack_limit: int | None,
    compile_step: bool | str = "auto",
    notice: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Train ``cfgs`` in this process, in packs of one key: at most ``pack_limit`` runs each, or, with
    ``None``, as many as :func:`iwae.pack.auto_pack_size` finds worth it on this device. Rows in order."""
    from iwae.pack import auto_pack_size, group_packs
    from iwae.state import training_images

    dev = pick_device()
    rows: dict[str, dict[str, Any]] = {}
    for group in group_packs(cfgs, 1 << 30):
        ds = data.load(group[0].dataset, group[0].split)
        size = pack_limit if pack_limit is not None else auto_pack_size(group, training_images(group[0], ds, dev))
        for members in group_packs(group, size):
            if len(members) > 1 and notice is not None:
                notice(f"training {len(members)} runs as one pack on {dev}")
            for c, row in zip(members, train_members(members, results, data, dataset=ds, compile_step=compile_step, progress=True)):
                rows[c.run_id] = row
    return [rows[c.run_id] for c in cfgs]


def record_run(cfg: RunConfig, results: Results, res: TrainResult, data: Dataset, dev: torch.device, pack: str = "") -> dict[str, Any]:
    """Measure a trained run's active units and write its training history and its row."""
    train_x = data.train[: cfg.train_subset] if cfg.train_subset else data.train
    variances = unit_variances(res.model, torch.as_tensor(train_x[: cfg.num_active_examples]))
    masks = active_masks(variances)
    results.write_rows(results.history_key(cfg.run_id), [{"run_id": cfg.run_id, **h} for h in res.history], "train")
    row = {
        **cfg.flat(),
        "label": cfg.label(),
        "config": json.dumps(cfg.to_dict(), sort_keys=True),
        "cell": cfg.cell_id,
        "status": "done",
        "error": "",
        "epochs_trained": len(res.history),
        "resumed_from_epoch": res.resumed_from_epoch,
        "train_seconds": res.seconds,
        "final_train_bound": res.history[-1]["train_bound"] if res.history else math.nan,
        "skipped_steps": int(sum(h["skipped_steps"] for h in res.history)),
        "active_h1": int(masks[0].sum()),
        "active_h2": int(masks[1].sum()) if len(masks) > 1 else None,
        "unit_var_h1": variances[0].tolist(),
        "unit_var_h2": variances[1].tolist() if len(variances) > 1 else None,
        "device": str(dev),
        "step_graphed": res.graphed,
        "step_compiled": res.compiled,
        "pack": pack,
        "finished_at": _now(),
        **versions(),
    }
    results.write_rows(results.row_key(cfg.run_id), [row], "runs")
    return row


def mark_failed(results: Results, cfg: RunConfig, error: str) -> dict[str, Any] | None:
    """Record a failed run so reports show it instead of dropping it; never over a done run (a few
    requests: its row, and HEADs of its history and final checkpoint). Returns the row it wrote."""
    if run_state(results, cfg.run_id).state == RunState.done:
        return None
    row = {
        **cfg.flat(),
        "label": cfg.label(),
        "config": json.dumps(cfg.to_dict(), sort_keys=True),
        "cell": cfg.cell_id,
        "status": "failed",
        "error": error.strip().splitlines()[-1][:500] if error.strip() else "failed",
        "finished_at": _now(),
        **versions(),
    }
    results.write_rows(results.row_key(cfg.run_id), [row], "runs")
    return row


# ---------------------------------------------------------------------------------------- evaluation


class Scorer:
    """Loads a run's model once (and its pruned version) and scores ranges of its images.

    One per worker process (see :func:`scorer`): consecutive ranges of a run reuse the loaded model.
    What a subclass changes is which model (:meth:`model`) and which images (:meth:`images`): a
    user's model (:mod:`pipeline.user_models`) is scored by the same code.
    """

    binarize = True  # images are grey levels, binarised per image id as the k=5000 evaluation does

    def __init__(self, ledger: EstimateLedger, data: DataSource, device: str | None = None):
        self.ledger, self.results, self.plan, self.data = ledger, ledger.results, ledger.plan, data
        self.device = pick_device(device)
        self._run_id: str | None = None
        self._loaded: tuple[IWAEModel, RunConfig] | None = None
        self._rows_read: dict[str, dict[str, Any] | None] = {}

    def _load(self, run_id: str) -> tuple[IWAEModel, RunConfig]:
        if self._run_id != run_id or self._loaded is None:
            try:
                self._loaded = model_from_checkpoint(load_final(self.results, run_id), f"run {run_id}'s final checkpoint", self.device)
            except checkpoint.CheckpointError as e:  # checked where it is read: bad input, one line for the whole command
                where = shlex.quote(self.results.location)
                raise UserError(f"{e}; run `iwae-pipeline repair --results {where}` to move it aside, then the sweep trains the run again") from None
            self._run_id = run_id
        return self._loaded

    def model(self, run_id: str) -> tuple[LatentModel, dict[str, Any]]:
        """The model to score and the config columns of its rows."""
        model, cfg = self._load(run_id)
        return model, cfg.flat()

    def _masks(self, run_id: str) -> list[torch.Tensor] | None:
        """The run's active units per layer, from its row (None when the row has no unit variances), read once per run."""
        if run_id not in self._rows_read:
            self._rows_read[run_id] = self.results.run_row(run_id)
        row = self._rows_read[run_id]
        if row is None or row["unit_var_h1"] is None:
            return None
        variances = [torch.tensor(row["unit_var_h1"])] + ([torch.tensor(row["unit_var_h2"])] if row["unit_var_h2"] is not None else [])
        return active_masks(variances)

    def images(self, run_id: str) -> np.ndarray:
        """The test set, or the training images the run was trained on (its subset, if any)."""
        _, cfg = self._load(run_id)
        ds = self.data.load(cfg.dataset, cfg.split)
        return ds.test if self.plan.images == "test" else ds.train[: cfg.train_subset or None]

    def _x(self, span: Span, images: np.ndarray | None, seed: int, option: str) -> torch.Tensor:
        """The range's images ``(n, X)`` (``images``: given for exactly the range), binarised by id."""
        ids = span.ids.tolist()
        if images is None:
            every = self.images(span.run_id)
            if span.last >= len(every):
                raise UserError(f"{option} {self.plan.num_images} exceeds the {len(every)} {self.plan.images} images of {span.run_id}")
            images = every[ids]
        x = torch.as_tensor(np.asarray(images))
        return (binarize_by_id(x, ids, seed) if self.binarize else x).to(self.device)

    def score(self, span: Span, images: np.ndarray | None = None) -> pa.Table:
        """Score one range: its rows, one per image, as an Arrow table of its table's schema."""
        if isinstance(self.plan, AISPlan):
            return self._score_ais(span, self.plan, images)
        model, flat = self.model(span.run_id)
        ec = self.plan.config
        ids = span.ids.tolist()
        scored: LatentModel = model
        if self.plan.pruned:
            masks = self._masks(span.run_id)
            if masks is None or not all(m.any() for m in masks):  # no units measured, or a layer with none active: nothing to prune to
                return self._rows(span, flat, None)
            if all(m.all() for m in masks):  # every unit active: the pruned model is this one, on the same draws
                same = EstimateLedger(self.results, self.plan.unpruned).rows(span.run_id, ids)
                if same is not None:
                    return same.set_column(same.schema.get_field_index("eval_pruned"), "eval_pruned", pa.array([True] * same.num_rows))
            else:
                assert isinstance(model, IWAEModel)
                scored = PrunedOnCommonDraws(model, masks)
        x = self._x(span, images, ec.seed, f"--{self.plan.images}-images")
        return self._rows(span, flat, estimate_log_px(scored, x, ids, ec))

    def _rows(self, span: Span, flat: dict[str, Any], est: Any) -> pa.Table:
        """The range's rows from an estimate (``None``: NaN figures, a pruned model that cannot exist)."""
        assert isinstance(self.plan, EvalPlan), "an importance-sampling plan"
        ec = self.plan.config
        rows = []
        for j, image_id in enumerate(span.ids.tolist()):
            row = {**flat, "eval_k": ec.k, "eval_seed": ec.seed, "eval_block": ec.block, "eval_pruned": self.plan.pruned, "image_id": int(image_id)}
            for col in ("log_px", "ess", "khat", "mcse", "log_px_jk"):
                row[col] = float(getattr(est, col)[j]) if est is not None else math.nan
            for c, p in enumerate(ec.prefixes):
                if p in PREFIXES:
                    row[f"l_{p}"] = float(est.prefix[j, c]) if est is not None else math.nan
            rows.append(row)
        return rows_table(rows, EVAL_SCHEMA)

    def _score_ais(self, span: Span, plan: AISPlan, images: np.ndarray | None = None) -> pa.Table:
        """AIS on the range's test images (binarised as the k=5000 evaluation does), or BDMC on the
        range's simulated images (:mod:`iwae.ais`)."""
        from iwae.ais import ais_log_px, bdmc

        model, flat = self.model(span.run_id)
        ids = span.ids.tolist()
        t0 = time.perf_counter()
        upper: list[float | None]
        if plan.method == "ais":
            x = self._x(span, images, plan.binarize_seed, "--ais-images")
            fwd = ais_log_px(model, x, plan.config, ids)
            upper = [None] * len(ids)
        else:
            b = bdmc(model, len(ids), plan.config, ids)
            fwd, upper = b.forward, b.upper.tolist()
        return self._ais_rows(span, flat, fwd, upper, (time.perf_counter() - t0) / len(ids))

    def _ais_rows(self, span: Span, flat: dict[str, Any], fwd: Any, upper: Sequence[float | None], seconds: float) -> pa.Table:
        """The range's AIS or BDMC rows from a forward pass ``fwd`` (``None``: NaN figures, for
        images a model fails on) and BDMC's upper bounds (``None`` per image for AIS)."""
        plan = self.plan
        assert isinstance(plan, AISPlan), "an AIS plan"
        c = plan.config
        common = {"method": plan.method, "ais_steps": c.steps, "ais_chains": c.chains, "ais_leapfrog": c.leapfrog, "ais_seed": c.seed}
        rows = [
            {
                **flat,
                **common,
                "eval_seed": plan.binarize_seed if plan.method == "ais" else None,
                "image_id": int(i),
                "log_px_ais": float(fwd.log_px[j]) if fwd is not None else math.nan,
                "log_px_upper": upper[j],
                "accept": float(fwd.accept[j]) if fwd is not None else math.nan,
                "ess": float(fwd.ess[j]) if fwd is not None else math.nan,
                "seconds": seconds,
            }
            for j, i in enumerate(span.ids.tolist())
        ]
        return rows_table(rows, AIS_SCHEMA)


_SCORERS: dict[tuple[Any, ...], Scorer] = {}


def cached_scorer(key: tuple[Any, ...], make: Callable[[], Scorer]) -> Scorer:
    """This process's scorer for ``key``, made once (models and data stay loaded between ranges);
    one at a time, so memory stays bounded."""
    if key not in _SCORERS:
        _SCORERS.clear()
        _SCORERS[key] = make()
    return _SCORERS[key]


def scorer(ledger: EstimateLedger, data: DataSource) -> Scorer:
    """This process's scorer for an estimate of the project's runs."""
    return cached_scorer((ledger.results.location, data.location, ledger.plan), lambda: Scorer(ledger, data))


def score_here(ledger: EstimateLedger, data: DataSource, items: Sequence[Span], progress: Callable[[int], None] | None = None) -> int:
    """The in-process executor (no Ray): score each range here and write it. Returns rows."""
    sc = Scorer(ledger, data)
    rows = 0
    for span in items:
        rows += ledger.write(span, sc.score(span))
        if progress:
            progress(1)
    return rows
