"""Score anyone's model: a researcher's latent-variable model, built by their own factory, through the
same sharded k=5000, AIS and BDMC evaluation, retries, repair and tables as the project's models.

``MODULE:FACTORY`` names a function of no arguments that returns the model (loading its own weights
from a path or URI): a :class:`~iwae.latent.LatentModel`, for example an
:class:`~iwae.adapter.DistributionModel` of an encoder and a decoder. MODULE is a module importable
from the current folder (``mymodels.vae``) or a file (``path/to/vae.py``). The model is stored under
its **key**: the name the user chooses plus a digest of its weights, so a changed model is never
mixed with an old one. On a cluster the module's folder reaches every node through Ray's runtime
environment (``working_dir``): no shared disk, no install.

Data is the project's binarised MNIST (the same test images and binarisation as the Table 1
evaluation, so a user's model and the paper's sit side by side), or the user's own array file
(``.npy``, ``.npz`` with one array, or Parquet of equal-length vectors), scored as it is (binarised
only with ``binarize``); its rows travel with each unit of work, so the nodes need no copy of it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import os
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline.datasource import DataSource
from pipeline.errors import UserError
from pipeline.store.estimates import AISPlan, EvalPlan, Span
from pipeline.store.ledger import EstimateLedger
from pipeline.work import Scorer, cached_scorer

MNIST = "mnist"


@dataclass(frozen=True)
class ModelRef:
    """A user's model as the work refers to it: the factory as the user named it, where it is found,
    the name, and the digest of its weights.

    ``target`` is the factory relative to ``root`` (``vae.py:make_model``, ``mymodels.vae:make_model``);
    ``root`` is the folder it is imported from, or ``None`` where that folder reached the worker as
    its working directory (Ray's runtime environment on a cluster)."""

    factory: str  # MODULE:FACTORY, as given
    name: str
    digest: str
    data: str  # what it scores (:func:`data_tag`): images of one kind share it, and only those are paired
    target: str
    root: str | None

    @property
    def key(self) -> str:
        """The model's id in the results location (its run id): name, weights and data, so changed
        weights are another model, and scores of other data are never mixed into its ranges."""
        return f"{self.name}-{self.digest[:12]}-{self.data}"

    def shipped(self) -> ModelRef:
        """The same model, imported on the workers from their working directory (the folder shipped to them)."""
        return replace(self, root=None)


def split_spec(spec: str) -> tuple[str, str]:
    module, sep, factory = spec.rpartition(":")
    if not sep or not module or not factory.isidentifier():
        raise UserError(f"{spec!r} is not MODULE:FACTORY; name a module (or a .py file) and a function in it, e.g. my_vae.py:make_model")
    return module, factory


def default_name(spec: str) -> str:
    """A model's name when the user gives none: its module's (``my_vae`` for ``my_vae.py:make_model``)."""
    module, _ = split_spec(spec)
    return re.sub(r"[^A-Za-z0-9_.-]", "_", Path(module).stem if _is_file(module) else module.rsplit(".", 1)[-1])[:64]


def _is_file(module: str) -> bool:
    return module.endswith(".py") or "/" in module


def locate(spec: str) -> tuple[str, str]:
    """``(root, target)``: the folder that holds the factory's module (or its top package), which is
    what reaches the nodes, and the factory relative to it."""
    module, factory = split_spec(spec)
    if _is_file(module):
        path = Path(module).expanduser().resolve()
        if not path.is_file():
            raise UserError(f"{path} does not exist; pass MODULE:FACTORY with a module importable from here or a .py file")
        return str(path.parent), f"{path.name}:{factory}"
    sys.path.insert(0, str(Path.cwd()))
    try:
        found = importlib.util.find_spec(module.split(".")[0])
    except (ImportError, ValueError):
        found = None
    finally:
        sys.path.pop(0)
    if found is not None and found.origin is None and found.submodule_search_locations:  # a namespace package
        return str(Path(next(iter(found.submodule_search_locations))).parent), spec
    if found is None or found.origin is None or found.origin in ("built-in", "frozen"):
        raise UserError(f"no module {module!r} here; pass MODULE:FACTORY with a module importable from {Path.cwd()} or a .py file")
    origin = Path(found.origin)
    return str(origin.parent.parent if origin.name == "__init__.py" else origin.parent), spec


PROJECT_PACKAGES = ("iwae", "pipeline", "jobs")
SHIP_LIMIT_MIB = 200  # Ray's working_dir travels through the GCS (512 MiB at most): weights that large belong at a URI
_NOT_SHIPPED = {".venv", ".git", "__pycache__", "results"}


def check_folder(root: str) -> None:
    """Before a model's folder is shipped to a cluster's nodes (Ray's working_dir, first on their
    import path): it must not hold a module named like one of the project's packages, which would
    shadow it there, nor be too large to ship. One line naming the fix otherwise."""
    folder = Path(root)
    clash = [n for n in PROJECT_PACKAGES if (folder / n).is_dir() or (folder / f"{n}.py").is_file()]
    if clash:
        raise UserError(
            f"{folder} holds {', '.join(clash)}, which would shadow this project's own package on the nodes; move the model's module into a folder of its own"
        )
    size = 0
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if d not in _NOT_SHIPPED]
        size += sum((Path(dirpath) / f).stat().st_size for f in filenames if (Path(dirpath) / f).is_file())
    if size > SHIP_LIMIT_MIB * 2**20:
        raise UserError(
            f"{folder} holds {size / 2**20:.0f} MiB, all of which would be shipped to every node; put the model's module in a folder of its own"
            f" (under {SHIP_LIMIT_MIB} MiB), and have the factory read large weights from a URI"
        )


def load_factory(target: str, root: str | None = None) -> Any:
    """The factory function of ``target`` (``MODULE:FACTORY``), imported from ``root`` (default: the
    current folder, which is the shipped folder on a Ray worker)."""
    module, name = split_spec(target)
    where = Path(root) if root is not None else Path.cwd()
    if str(where) not in sys.path:  # the module's siblings import as they do beside it (`python vae.py`), now and later
        sys.path.insert(0, str(where))
    try:
        if _is_file(module):
            path = (where / Path(module).expanduser()).resolve()
            mod_name = f"iwae_user_{path.stem}"
            if getattr(sys.modules.get(mod_name), "__file__", None) != str(path):
                loader = importlib.util.spec_from_file_location(mod_name, path)
                if loader is None or loader.loader is None:
                    raise UserError(f"cannot load {path} as a Python module")
                mod = importlib.util.module_from_spec(loader)
                sys.modules[mod_name] = mod
                loader.loader.exec_module(mod)
            mod = sys.modules[mod_name]
        else:
            mod = importlib.import_module(module)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001  # an import that fails in the user's code: one line
        raise UserError(f"cannot import {module} ({type(e).__name__}: {_first(e)}); fix the module, or run from its folder") from None
    factory = getattr(mod, name, None)
    if not callable(factory):
        raise UserError(f"{module} has no function {name}; name the factory that returns the model")
    return factory


def build(target: str, root: str | None, device: torch.device) -> tuple[Any, str]:
    """Call the factory; the model (checked against the protocol) on ``device``, and its weights' digest."""
    from iwae.latent import check

    spec = target
    factory = load_factory(target, root)
    try:
        model = factory()
    except (UserError, OSError):
        raise  # an OSError (weights at a URI that did not answer) is the executor's to retry on a node
    except Exception as e:  # noqa: BLE001  # the factory raised: one line
        raise UserError(f"{spec} raised {type(e).__name__}: {_first(e)}; fix the factory") from None
    try:
        model = check(model)
    except TypeError as e:
        raise UserError(f"{spec} returned {_first(e)}") from None
    if isinstance(model, torch.nn.Module):
        model = model.to(device)
    return model, digest(model, _source(factory))


def _source(factory: Any) -> bytes:
    """The text of the factory's module (its code is part of the model: a fixed log_joint is another model)."""
    import inspect

    try:
        return Path(inspect.getfile(factory)).read_bytes()
    except (TypeError, OSError):
        return b""


def digest(model: Any, source: bytes = b"") -> str:
    """A sha256 of the model's weights (its ``state_dict``: names, dtypes, shapes and bytes) and of
    its module's code. A model without weights that a ``state_dict`` shows is refused: two such
    models could not be told apart."""
    h = hashlib.sha256(source)
    state = model.state_dict() if callable(getattr(model, "state_dict", None)) else {}
    if not state:
        raise UserError(
            f"the model ({type(model).__name__}) shows no weights in its state_dict, so a changed model could not get a new key; register its"
            " networks and tensors on it (model.enc = enc; model.register_buffer('W', W)), which also moves them to the model's device"
        )
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def load_array(path: str) -> np.ndarray:
    """A user's data file as ``(N, X)`` float32: ``.npy``, ``.npz`` with one array, or Parquet."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{p} does not exist; pass --data mnist or an .npy, .npz or .parquet file of vectors")
    try:
        if p.suffix == ".npy":
            a = np.load(p, allow_pickle=False)
        elif p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                if len(z.files) != 1:
                    raise UserError(f"{p} holds {len(z.files)} arrays ({', '.join(z.files)}); save the one to score alone")
                a = z[z.files[0]]
        elif p.suffix == ".parquet":
            import pyarrow.parquet as pq

            t = pq.read_table(p)
            a = np.stack([np.asarray(v, dtype=np.float32) for v in t.column(0).to_pylist()]) if t.num_columns == 1 else t.to_pandas().to_numpy()
        else:
            raise UserError(f"{p}: unknown data file; use .npy, .npz (one array) or .parquet (a column of vectors, or one column per feature)")
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001  # a damaged or foreign file: one line
        raise UserError(f"{p} does not read as an array ({type(e).__name__}: {_first(e)})") from None
    if a.ndim != 2 or not np.issubdtype(a.dtype, np.number):
        raise UserError(f"{p} holds an array of shape {a.shape} ({a.dtype}); the data must be vectors, shape (N, X)")
    return a.astype(np.float32)


def probe(model: Any, x: torch.Tensor) -> None:
    """A few images through the model: one line naming the expected shape or dtype when its outputs
    do not fit (x ``(B, X)``, latents ``[(K, B, D)]``, log q and log p(x, h) ``(K, B)``, floating)."""
    b = x.shape[0]
    gens = [torch.Generator().manual_seed(i) for i in range(b)]
    from iwae.latent import Unscorable

    try:
        prop = model.propose(x, 3, gens)
        h, log_q = prop.h, prop.log_q
        joint = model.log_joint(x, h)
    except Unscorable as e:  # a model the evaluators cannot score as written (a Pyro model's global latent, say): its own line
        raise UserError(f"{type(model).__name__} cannot be scored: {e}") from None
    except Exception as e:  # noqa: BLE001  # the user's code raised on data of this width: one line
        why = f"{type(e).__name__}: {_first(e)}"
        raise UserError(f"the model raised on data of width {x.shape[1]} ({why}); check the data's width against the model's") from None
    if not isinstance(h, (list, tuple)) or not all(isinstance(t, torch.Tensor) and t.dim() >= 2 and tuple(t.shape[:2]) == (3, b) for t in h):
        got = [tuple(t.shape) for t in h] if isinstance(h, (list, tuple)) else type(h).__name__
        raise UserError(f"the model's propose(x, k=3, ...) returned latents {got}; expected a list of tensors of shape (K, B, D) = (3, {b}, D)")
    for what, t in (("log q(h|x)", log_q), ("log p(x, h)", joint)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (3, b) or not t.is_floating_point():
            got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise UserError(f"the model's {what} is {got}; expected a floating tensor of shape (K, B) = (3, {b})")


def _first(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


# ---------------------------------------------------------------------------------------- scoring


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise UserError(f"--name {name!r}: use letters, digits, '.', '_' and '-' (at most 64, a letter or digit first)")
    return name


def data_tag(data_spec: str, binarize: bool, array: np.ndarray | None) -> str:
    """What a model scores, as a name: ``mnist`` (the binarised test images of Table 1's evaluation),
    ``mnist-grey``, or a user's file by its stem and the digest of its values (``-bin`` binarised)."""
    if array is None:
        return MNIST if binarize else f"{MNIST}-grey"
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(data_spec).stem)[:32] or "data"
    return f"file-{stem}-{hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:8]}" + ("-bin" if binarize else "")


def row_fields(ref: ModelRef) -> dict[str, Any]:
    """The config columns of a user model's rows."""
    return {"run_id": ref.key, "dataset": ref.data}


class UserScorer(Scorer):
    """Scores ranges of images with a user's model: the model comes from its factory (built once per
    worker process and checked against the digest the command scored), the images from MNIST on the
    node or from the unit of work itself. The scoring is :class:`pipeline.work.Scorer`'s."""

    def __init__(self, ledger: EstimateLedger, data: DataSource, ref: ModelRef, binarize: bool):
        super().__init__(ledger, data)
        self.ref, self.binarize = ref, binarize
        self._user: Any = None

    def model(self, run_id: str) -> tuple[Any, dict[str, Any]]:
        if self._user is None:
            model, got = build(self.ref.target, self.ref.root, self.device)
            if got != self.ref.digest:
                raise UserError(
                    f"{self.ref.factory} returns other weights here (digest {got[:12]}, scored {self.ref.digest[:12]}); make the factory load"
                    " the same weights on every node (a URI, or a file in the module's folder, which travels with it)"
                )
            self._user = model
        return self._user, row_fields(self.ref)

    def images(self, run_id: str) -> np.ndarray:
        return np.asarray(self.data.load(MNIST).test)

    def score(self, span: Span, images: np.ndarray | None = None) -> pa.Table:
        """The range's rows, as :class:`~pipeline.work.Scorer` scores them. An image with a non-finite
        log density keeps its row as it is; where the model raises, the range's images are scored one
        at a time (each image is seeded by its id, so the others' numbers are the same) and those it
        raises on get NaN rows. Both are named by the command and left out of every mean; the rest
        are scored. A model that does not build, images that do not load, storage, network and
        memory errors fail the range instead (the executor retries what may pass on another try)."""
        self.model(span.run_id)
        if images is None and self.plan.images == "test" and not (isinstance(self.plan, AISPlan) and self.plan.method == "bdmc"):
            self.images(span.run_id)
        try:
            return super().score(span, images)  # non-finite figures are the rows of images the model fails on, as they are
        except TRANSIENT:
            raise  # the executor's to retry: not the images' fault
        except Exception:  # noqa: BLE001  # the model raised on this range: find the images it raises on
            if span.first == span.last:
                return self._failed(span)  # one image (the command names it, with what the model raises on it)
        parts, raised = [], []
        for j, i in enumerate(span.ids.tolist()):
            one = Span(span.run_id, i, i)
            try:
                parts.append(super().score(one, None if images is None else images[j : j + 1]))
            except TRANSIENT:
                raise
            except Exception as e:  # noqa: BLE001  # this image: a NaN row, named by the command
                parts.append(self._failed(one))
                raised.append(e)
        if len(raised) == len(parts) and len(parts) > 1:  # not an image's trouble: the model (or its set-up here) fails on all
            first = raised[0]
            raise RuntimeError(f"{self.ref.factory} raised on every image of {span} ({type(first).__name__}: {_first(first)})") from first
        return pa.concat_tables(parts)

    def _failed(self, span: Span) -> pa.Table:
        """NaN rows for images the model fails on."""
        _, flat = self.model(span.run_id)
        if isinstance(self.plan, EvalPlan):
            return self._rows(span, flat, None)
        upper = [math.nan if self.plan.method == "bdmc" else None] * len(span.ids)
        return self._ais_rows(span, flat, None, upper, math.nan)


def _bad(table: pa.Table) -> np.ndarray:
    """The image ids of a scored table without a finite log p(x) (or a finite BDMC upper bound)."""
    cols = ["log_px"] if "log_px" in table.column_names else ["log_px_ais"]
    if "log_px_upper" in table.column_names and table.column("log_px_upper").null_count < table.num_rows:
        cols.append("log_px_upper")
    ok = np.ones(table.num_rows, dtype=bool)
    for c in cols:
        ok &= np.isfinite(np.asarray(table.column(c).to_numpy(zero_copy_only=False), dtype=float))
    return np.asarray(table.column("image_id").to_numpy())[~ok]


def model_rows(results: Any, plan: Any, key: str) -> pa.Table:
    """A user model's rows of one estimate, its first ``plan.num_images`` images, each once, read
    through the estimate's ledger (its own folder, files written whole)."""
    from pipeline.store.results import SCHEMAS

    t = EstimateLedger(results, plan).rows(key, range(plan.num_images))
    return t if t is not None else SCHEMAS[plan.table].empty_table()


def failed_images(results: Any, plan: Any, key: str) -> list[int]:
    """The images of a user model's estimate that it failed on (NaN rows, see :meth:`UserScorer.score`)."""
    return sorted(int(i) for i in _bad(model_rows(results, plan, key)))


def why_failed(model: Any, x: torch.Tensor, image_id: int) -> str:
    """Why the model fails on one image, in a few words: the error it raises, or the figure it gives."""
    gen = [torch.Generator().manual_seed(image_id)]
    try:
        with torch.no_grad():
            prop = model.propose(x, 4, gen)
            joint = model.log_joint(x, prop.h)
    except Exception as e:  # noqa: BLE001  # the user's model raised: its message
        return f"{type(e).__name__}: {_first(e)[:120]}"
    lw = joint - prop.log_q
    return f"log p(x, h) - log q(h|x) = {float(lw.flatten()[0]):g}"


# never an image's fault: a user error, storage or network, memory (retried by the executor, or one line)
TRANSIENT = (UserError, OSError, torch.OutOfMemoryError)


def score_user_unit(ledger: Any, data: Any, ref: ModelRef, binarize: bool, spans: Any, images: list[np.ndarray] | None) -> int:
    """A unit of the executor: ranges of images scored with a user's model, each written as it is
    done (``images``: each range's own rows of a user's data file; None: MNIST's test images on the
    node). Returns the rows written."""
    key = (ledger.results.location, data.location, ledger.plan, ref, binarize)
    sc = cached_scorer(key, lambda: UserScorer(ledger, data, ref, binarize))
    return sum(ledger.write(span, sc.score(span, None if images is None else images[j])) for j, span in enumerate(spans))
