"""Where the data comes from: the user's ``--data-dir``, made once by the command and passed down.

A :class:`DataSource` is a location (a local folder, made absolute, or a URI such as
``s3://bucket/data``) and pickles as that, so it travels into Ray tasks as it is.
On each node :meth:`DataSource.folder` finds a local folder holding the dataset: the location
itself when this node has it, else the node's own cache, filled once per node under a file lock
(MNIST fetched and sha256-checked, or copied from the URI) and rebuilt there when it is stale.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from iwae.data import MNIST_NPZ, DataError, Dataset, fetch_mnist, load_dataset
from iwae.files import write_atomic
from pipeline.errors import UserError
from pipeline.store.objects import Store, is_uri, refuse_credentials


def node_cache_dir() -> Path:
    """This node's own data cache: ``$IWAE_CACHE_DIR`` or ``~/.cache/iwae-pipeline``."""
    return Path(os.environ.get("IWAE_CACHE_DIR") or Path.home() / ".cache" / "iwae-pipeline").absolute()


def _has_data(name: str, folder: Path) -> bool:
    if name == "mnist":
        return (folder / MNIST_NPZ).exists() or (folder / "train-images-idx3-ubyte").exists() or (folder / "train-images-idx3-ubyte.gz").exists()
    if name == "omniglot":
        return (folder / "chardata.mat").exists()
    return True


def _reads(name: str, folder: Path, split: str) -> Dataset | None:
    """The cached dataset when its files load as the current format (a cache from before the pixel
    fix does not: None). Kept by :meth:`DataSource.load`, which would otherwise load it again."""
    try:
        return load_dataset(name, folder, split)
    except DataError:
        return None


_LOADED: dict[tuple[str, str, str], Dataset] = {}


@dataclass(frozen=True)
class DataSource:
    location: str  # a local folder (absolute) or a URI

    @classmethod
    def open(cls, location: str | Path) -> DataSource:
        loc = str(location)
        refuse_credentials(loc)  # --data-dir s3://KEY:SECRET@...: one line, before it travels to any node
        return cls(loc if is_uri(loc) else str(Path(loc).expanduser().absolute()))

    def __str__(self) -> str:
        return self.location

    @property
    def is_uri(self) -> bool:
        return is_uri(self.location)

    def folder(self, name: str) -> Path:
        """A local folder holding dataset ``name`` on this node (see the module docstring)."""
        return self._fill(name, "paper")[0]

    def _fill(self, name: str, split: str) -> tuple[Path, Dataset | None]:
        """:meth:`folder`, with the dataset (``split``) when checking this node's cache loaded it (None otherwise)."""
        from filelock import FileLock

        if not self.is_uri and _has_data(name, Path(self.location)):
            return Path(self.location), None
        cache = node_cache_dir()
        if self.is_uri:
            cache = cache / hashlib.sha256(self.location.encode()).hexdigest()[:12]
        cache.mkdir(parents=True, exist_ok=True)
        with FileLock(str(cache / "_fetch.lock"), timeout=1800):
            if _has_data(name, cache) and (ds := _reads(name, cache, split)) is not None:
                return cache, ds
            if self.is_uri:
                store = Store.open(self.location)
                for fname in (MNIST_NPZ,) if name == "mnist" else ("chardata.mat",):
                    try:
                        write_atomic(cache / fname, store.read_bytes(fname))
                    except FileNotFoundError:
                        raise DataError(f"{store.uri(fname)} not found; copy {fname} there or pass a local --data-dir") from None
            elif name == "mnist":
                fetch_mnist(cache)  # also rebuilds a stale cache
            else:
                raise DataError(
                    f"{name} is not in {self.location} on node {os.uname().nodename}; copy it there, or put it in object storage and pass --data-dir s3://..."
                )
        return cache, None

    def load(self, name: str, split: str = "paper") -> Dataset:
        """The dataset, loaded once per process (workers reuse it across trials and shards)."""
        key = (name, self.location, split)
        if key not in _LOADED:
            _LOADED.clear()  # one dataset at a time: bounded memory
            folder, ds = self._fill(name, split)  # a cache checked by loading it is not loaded twice
            _LOADED[key] = ds if ds is not None else load_dataset(name, folder, split)
        return _LOADED[key]

    def check_here(self, dataset: str) -> None:
        """Before any work on this machine: the data is here and current (a cluster's nodes fetch
        their own, and a URI is read on the nodes, so those are not checked here)."""
        if self.is_uri or dataset == "synthetic":
            return
        folder = Path(self.location)
        if dataset == "mnist" and not _has_data("mnist", folder):
            raise UserError(f"MNIST is not in {folder}; run `iwae-pipeline data fetch mnist --data-dir {folder}` (or pass --data-dir with it)")
        load_dataset(dataset, folder)  # present but damaged or stale: its own one-line error
