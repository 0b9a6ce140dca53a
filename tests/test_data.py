"""Data: safe unpickling, checksums, IDX and Omniglot loaders, dynamic binarisation."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from iwae import data as D


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_numpy_only_unpickler_loads_arrays_and_refuses_anything_else():
    """A pickle of arrays loads; one that calls any other global is refused before running it."""
    arrays = (np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2]))
    out = D.load_numpy_pickle(pickle.dumps(arrays, protocol=2))
    assert np.array_equal(out[0], arrays[0]) and np.array_equal(out[1], arrays[1])
    with pytest.raises(pickle.UnpicklingError, match="only numpy arrays"):
        D.load_numpy_pickle(pickle.dumps(Evil()))
    with pytest.raises(pickle.UnpicklingError):
        D.load_numpy_pickle(pickle.dumps({"x": np.zeros(2), "os": __import__("os").getcwd}))


def test_tampered_mnist_pickle_is_rejected_by_checksum(tmp_path):
    """A pickle whose sha256 differs from the known one is refused with a one-line fix."""
    blob = gzip.compress(pickle.dumps(((np.zeros((2, 784), np.float32), np.zeros(2)),) * 3, protocol=2))
    with pytest.raises(D.DataError, match="sha256.*data fetch mnist"):
        D.mnist_npz_from_pickle_gz(blob, tmp_path / "mnist.npz")
    assert not (tmp_path / "mnist.npz").exists()


def test_missing_and_damaged_mnist_give_one_line_errors(tmp_path):
    """No data -> says to run data fetch; a truncated npz -> says to delete and re-fetch."""
    with pytest.raises(D.DataError, match="iwae-pipeline data fetch mnist") as e:
        D.load_mnist(tmp_path)
    assert "\n" not in str(e.value)
    D.atomic_save_npz(
        tmp_path / "mnist.npz",
        {"x_train": np.zeros((3, 784), np.float32), "x_valid": np.zeros((1, 784), np.float32), "x_test": np.zeros((2, 784), np.float32)},
    )
    raw = (tmp_path / "mnist.npz").read_bytes()
    (tmp_path / "mnist.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(D.DataError, match="damaged"):
        D.load_mnist(tmp_path)


def _write_idx(path, images):
    n, r, c = images.shape
    path.write_bytes(struct.pack(">IIII", 0x803, n, r, c) + images.astype(np.uint8).tobytes())


def test_idx_files_load_and_take_precedence(tmp_path):
    """LeCun IDX files (plain or gz) load as pixels/255, train+test, and the authors' split cuts 59,600."""
    rng = np.random.default_rng(0)
    tr, te = rng.integers(0, 256, (60, 28, 28)), rng.integers(0, 256, (10, 28, 28))
    _write_idx(tmp_path / D.IDX_TRAIN, tr)
    raw = tmp_path / "t"
    _write_idx(raw, te)
    (tmp_path / f"{D.IDX_TEST}.gz").write_bytes(gzip.compress(raw.read_bytes()))
    ds = D.load_mnist(tmp_path)
    assert ds.train.shape == (60, 784) and ds.test.shape == (10, 784)
    assert np.allclose(ds.train[3], tr[3].reshape(-1) / 255.0)
    (tmp_path / D.IDX_TRAIN).write_bytes((tmp_path / D.IDX_TRAIN).read_bytes()[:-5])
    with pytest.raises(D.DataError, match="truncated"):
        D.load_mnist(tmp_path)


def test_omniglot_loader_on_a_file_of_chardata_structure(tmp_path):
    """chardata.mat: (784, N) arrays, transposed and Fortran-reshaped; sizes 24,345 / 8,070."""
    import scipy.io

    rng = np.random.default_rng(0)
    train = rng.random((784, 24_345), dtype=np.float32)
    test = rng.random((784, 8_070), dtype=np.float32)
    scipy.io.savemat(tmp_path / "chardata.mat", {"data": train, "testdata": test, "target": np.zeros((50, 24_345))})
    ds = D.load_omniglot(tmp_path)
    assert ds.train.shape == (24_345, 784) and ds.test.shape == (8_070, 784)
    img = train[:, 5].reshape(28, 28)  # authors: reshape((-1, 28, 28)).reshape((-1, 784), order="F")
    assert np.allclose(ds.train[5], img.reshape(-1, order="F"))
    auth = D.load_omniglot(tmp_path, split="authors")
    assert auth.train.shape == (23_000, 784)
    scipy.io.savemat(tmp_path / "chardata.mat", {"data": train[:, :100], "testdata": test})
    with pytest.raises(D.DataError, match="24345"):
        D.load_omniglot(tmp_path)


def test_dynamic_binarisation_is_fresh_and_has_the_right_mean():
    """Each read draws new bits; their mean equals the grey level."""
    x = torch.full((200, 784), 0.3)
    g = torch.Generator().manual_seed(0)
    a, b = D.binarize(x, g), D.binarize(x, g)
    assert not torch.equal(a, b)
    assert set(a.unique().tolist()) == {0.0, 1.0}
    assert abs(a.mean().item() - 0.3) < 0.005


def test_pickle_pixels_become_the_papers_idx_over_255(tmp_path):
    """The pickle's v/256 pixels cached as npz equal LeCun's IDX bytes / 255 on the same images, exactly."""
    rng = np.random.default_rng(1)
    tr, te = rng.integers(0, 256, (7, 28, 28)), rng.integers(0, 256, (3, 28, 28))
    tr[0, 0, 0], tr[0, 0, 1] = 255, 0  # white and black present
    _write_idx(tmp_path / D.IDX_TRAIN, tr)
    _write_idx(tmp_path / D.IDX_TEST, te)
    idx = D.load_mnist(tmp_path)
    pickled = [(a.reshape(len(a), 784).astype(np.float32) / np.float32(256.0), np.zeros(len(a))) for a in (tr[:5], tr[5:], te)]
    npz_dir = tmp_path / "npz"
    arrays = {"version": np.array(D.MNIST_NPZ_VERSION)}
    for name, (x, y) in zip(("train", "valid", "test"), pickled):
        arrays[f"x_{name}"] = D.pickle_pixels_to_bytes(x)
        arrays[f"y_{name}"] = y
    D.atomic_save_npz(npz_dir / D.MNIST_NPZ, arrays)
    from_npz = D.load_mnist(npz_dir)
    assert np.array_equal(from_npz.train, idx.train) and np.array_equal(from_npz.test, idx.test)
    assert from_npz.train.max() == 1.0 and from_npz.train.dtype == np.float32
    with pytest.raises(D.DataError, match="k/256"):
        D.pickle_pixels_to_bytes(np.full((1, 784), 0.3, np.float32))


def test_a_stale_pixel_cache_is_refused_and_rebuilt(tmp_path):
    """An npz from before the fix (no version, pixels /256) is not trusted: loading names the fetch that rebuilds it."""
    stale = {k: np.full((2, 784), 255 / 256, np.float32) for k in ("x_train", "x_valid", "x_test")}
    D.atomic_save_npz(tmp_path / D.MNIST_NPZ, stale)
    with pytest.raises(D.DataError, match="stale.*data fetch mnist"):
        D.load_mnist(tmp_path)


def test_the_fetched_mnist_has_the_papers_pixels(mnist_dir):
    """The real cache: white is exactly 1.0 and every pixel is a byte / 255 (256 grey levels)."""
    ds = D.load_mnist(str(mnist_dir))  # a str path works as well as a Path
    assert ds.train.max() == 1.0 and ds.test.max() == 1.0
    levels = np.unique(ds.test)
    assert len(levels) <= 256 and np.allclose(levels * 255, np.rint(levels * 255), atol=1e-4)
