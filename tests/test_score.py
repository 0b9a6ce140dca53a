"""`iwae-pipeline score`: anyone's model through the sharded evaluation. A user's linear-Gaussian
model on continuous data (its log p(x) known in closed form) scored by the command and in a notebook
the same; a re-run scores nothing; images a model fails on are named and the rest scored; every bad
input is one line, exit 2, nothing written. The paper's demo model through the adapter gives
`evaluate`'s numbers in tests/test_pipeline.py; the 3-node cluster case in tests/test_cluster.py."""

import numpy as np
import pandas as pd
import pytest
import torch

from iwae.evaluate import EvalConfig, estimate_log_px
from pipeline.cli import main
from pipeline.store.estimates import read_estimates

pytestmark = pytest.mark.slow

LINEAR_GAUSSIAN = '''
"""A user's linear-Gaussian model: h ~ N(0, I_2), x | h ~ N(W h + b, 0.6^2 I_5), so
x ~ N(b, W W^T + 0.36 I) exactly. The encoder is the exact posterior made worse on purpose."""
import torch
from torch.distributions import Independent, MultivariateNormal, Normal

from iwae.adapter import DistributionModel

g = torch.Generator().manual_seed(0)
W, B, S = torch.randn(5, 2, generator=g), torch.randn(5, generator=g), 0.6
COV = torch.linalg.inv(torch.eye(2) + W.T @ W / S**2)
GAIN = COV @ W.T / S**2


def encoder(x):
    mean = 0.8 * (x - B) @ GAIN.T
    return Independent(Normal(mean, 1.3 * COV.diagonal().sqrt().expand_as(mean)), 1)


def decoder(h):
    return Independent(Normal(h @ W.T + B, torch.full_like(h @ W.T, S)), 1)


def exact_log_px(x):
    return MultivariateNormal(B, W @ W.T + S**2 * torch.eye(5)).log_prob(x)


def make_model():
    m = DistributionModel(encoder, decoder, 2)
    m.register_buffer("W", W)  # its weights: what the key's digest is taken of
    m.register_buffer("B", B)
    return m
'''


@pytest.fixture
def linear_gaussian(tmp_path):
    """The user's module in a folder of its own (not on sys.path), and 600 rows of its data."""
    folder = tmp_path / "theirs"
    folder.mkdir()
    (folder / "lg.py").write_text(LINEAR_GAUSSIAN)
    g = torch.Generator().manual_seed(1)
    import importlib.util

    spec = importlib.util.spec_from_file_location("lg_for_test", folder / "lg.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    x = (mod.B + torch.randn(600, 2, generator=g) @ mod.W.T + mod.S * torch.randn(600, 5, generator=g)).numpy().astype(np.float32)
    np.save(folder / "x.npy", x)
    return folder, mod, x


def rows(results, estimate, table="eval"):
    return read_estimates(str(results), table, estimate).set_index("image_id").sort_index()


def test_a_user_model_scored_by_the_command_matches_the_notebook_and_its_closed_form(capsys, ray_local, tmp_path, linear_gaussian):
    """Two ranges of a user's file scored on Ray give, image by image, what one in-process call on all
    600 gives (sharded = unsharded); k=5000 agrees with the exact log density within its errors; a
    re-run scores nothing; the report's models table says it is a density."""
    folder, mod, x = linear_gaussian
    results = tmp_path / "r"
    argv = ["score", f"{folder}/lg.py:make_model", "--name", "lg", "--data", folder / "x.npy", "--results", results, "--eval-workers", "2"]
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "minus log density" in out and "600 scored now" in out, out
    got = rows(results, "k5000-seed123-block500")
    assert len(got) == 600 and got.index.tolist() == list(range(600)) and got.run_id.nunique() == 1
    assert len(list((results / "tables" / "eval").glob("*/*/images-*.parquet"))) == 2  # two ranges, 0-499 and 500-599
    here = estimate_log_px(mod.make_model(), torch.as_tensor(x), list(range(600)), EvalConfig())
    np.testing.assert_allclose(got.log_px.to_numpy(), here.log_px.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(got.khat.to_numpy(), here.khat.numpy(), rtol=0, atol=1e-4)
    exact = mod.exact_log_px(torch.as_tensor(x)).numpy()
    diff = got.log_px.to_numpy() - exact
    assert abs(diff.mean()) < 4 * np.sqrt((got.mcse.to_numpy() ** 2).sum()) / 600 + 0.005, diff.mean()
    before = {p: p.stat().st_mtime_ns for p in (results / "tables").rglob("*.parquet")}
    assert main([str(a) for a in argv]) == 0
    assert "0 scored now" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (results / "tables").rglob("*.parquet")} == before
    assert main(["report", "--results", str(results)]) == 0
    md = capsys.readouterr().out
    assert "Models scored with" in md and "(density)" in md and "| lg |" in md, md


def test_ais_and_bdmc_of_a_user_model_agree_with_its_closed_form(capsys, ray_local, tmp_path, linear_gaussian):
    """AIS on the first 40 rows is within 0.05 nats of the exact mean log density; BDMC's bounds
    bracket it on images simulated from the model; the models table shows AIS - L_k."""
    folder, mod, x = linear_gaussian
    results = tmp_path / "r"
    common = [f"{folder}/lg.py:make_model", "--data", folder / "x.npy", "--results", results]
    assert main([str(a) for a in ["score", *common, "--test-images", 40, "--eval-k", 500]]) == 0
    assert main([str(a) for a in ["score", *common, "--method", "ais", "--ais-images", 40, "--ais-steps", 100, "--ais-chains", 8]]) == 0
    assert main([str(a) for a in ["score", *common, "--method", "bdmc", "--bdmc-images", 20, "--ais-steps", 100, "--ais-chains", 8]]) == 0
    capsys.readouterr()
    a = rows(results, "T100-C8-L10-P100-seed0", "ais")
    exact = mod.exact_log_px(torch.as_tensor(x[:40])).numpy()
    assert abs((a.log_px_ais.to_numpy() - exact).mean()) < 0.05
    b = rows(results, "T100-C8-L10-P100-seed0", "bdmc")
    assert len(b) == 20 and (b.log_px_upper - b.log_px_ais).mean() > -0.05 and (b.log_px_upper - b.log_px_ais).mean() < 0.5
    assert main(["report", "--results", str(results)]) == 0
    md = capsys.readouterr().out
    line = next(ln for ln in md.splitlines() if ln.startswith("| lg |"))
    assert line.count(" - ") < 3, line  # AIS, its gap and BDMC filled in


FAILING = """
import torch
from torch.distributions import Bernoulli, Independent
from iwae.adapter import DistributionModel, gaussian_encoder

torch.manual_seed(0)
enc, dec = torch.nn.Linear(6, 4), torch.nn.Linear(2, 6)


def decoder(h):
    return Independent(Bernoulli(logits=dec(h), validate_args=True), 1)  # raises on values outside {0, 1}, whatever the global default


def make_model():
    m = DistributionModel(gaussian_encoder(lambda x: enc(x).chunk(2, -1)), decoder, 2)
    m.enc, m.dec = enc, dec
    return m
"""


def test_images_a_model_fails_on_are_named_and_the_rest_scored(capsys, ray_local, tmp_path):
    """A Bernoulli decoder on data where two rows are not binary: those two are named (exit 1), the
    other rows are scored with the numbers they get alone, and the report counts the failed ones."""
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "f.py").write_text(FAILING)
    x = (np.random.default_rng(0).random((30, 6)) < 0.5).astype(np.float32)
    x[[4, 17], 2] = 0.5  # outside the Bernoulli's support: the user's model raises on these images
    np.save(folder / "x.npy", x)
    results = tmp_path / "r"
    rc = main(["score", f"{folder}/f.py:make_model", "--data", str(folder / "x.npy"), "--eval-k", "50", "--results", str(results)])
    err = capsys.readouterr().err
    assert rc == 1 and "on 2 of 30 images (ids 4, 17;" in err and "ValueError" in err, err
    got = rows(results, "k50-seed123-block500")
    assert len(got) == 30 and got.log_px.isna().sum() == 2 and got.log_px.drop([4, 17]).notna().all()
    spec = __import__("importlib.util").util.spec_from_file_location("f_for_test", folder / "f.py")
    mod = __import__("importlib.util").util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    keep = [i for i in range(30) if i not in (4, 17)]
    here = estimate_log_px(mod.make_model(), torch.as_tensor(x[keep]), keep, EvalConfig(k=50))
    np.testing.assert_allclose(got.log_px.loc[keep].to_numpy(), here.log_px.numpy(), rtol=0, atol=1e-5)
    assert main(["report", "--results", str(results)]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| f |"))
    assert line.rstrip(" |").endswith("2"), line


def one_line(capsys, argv, match, code=2):
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == code and len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], err
    return lines[0]


MNIST_VAE = """
from pathlib import Path
import torch
from torch.distributions import Bernoulli, Independent
from iwae.adapter import DistributionModel, gaussian_encoder

enc, dec = torch.nn.Linear(784, 8), torch.nn.Linear(4, 784)


def make_model():
    state = torch.load(Path(__file__).with_name("w.pt"))
    enc.load_state_dict(state["enc"]), dec.load_state_dict(state["dec"])
    m = DistributionModel(gaussian_encoder(lambda x: enc(x).chunk(2, -1)), lambda h: Independent(Bernoulli(logits=dec(h)), 1), 4)
    m.enc, m.dec = enc, dec
    return m


def unstable():
    m = DistributionModel(gaussian_encoder(lambda x: enc(x).chunk(2, -1)), lambda h: Independent(Bernoulli(logits=dec(h)), 1), 4)
    m.w = torch.nn.Linear(2, 2)  # new random weights on each call
    return m


def raises():
    raise RuntimeError("weights not found at s3://nowhere")


def unregistered():
    return DistributionModel(gaussian_encoder(lambda x: enc(x).chunk(2, -1)), lambda h: Independent(Bernoulli(logits=dec(h)), 1), 4)


def not_a_model():
    return torch.nn.Linear(2, 2)


class Transposed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.zeros(1))

    def propose(self, x, k, generators):
        from iwae.latent import Proposal
        h = torch.zeros(x.shape[0], k, 4)  # (B, K, D): the wrong way round
        return Proposal([h], torch.zeros(x.shape[0], k), None)

    def log_joint(self, x, h):
        return torch.zeros(h[0].shape[:2])

    def simulate(self, n, generators):
        raise NotImplementedError


def transposed():
    return Transposed()
"""


@pytest.fixture
def mnist_vae(tmp_path):
    folder = tmp_path / "user"
    folder.mkdir()
    (folder / "vae.py").write_text(MNIST_VAE)
    (folder / "broken.py").write_text("def make_model(:\n")
    torch.manual_seed(3)
    torch.save({"enc": torch.nn.Linear(784, 8).state_dict(), "dec": torch.nn.Linear(4, 784).state_dict()}, folder / "w.pt")
    np.save(folder / "narrow.npy", np.zeros((10, 10), np.float32))
    np.save(folder / "grey.npy", np.full((10, 784), 3.0, np.float32))
    np.savez(folder / "two.npz", a=np.zeros((2, 784)), b=np.zeros((2, 784)))
    return folder


@pytest.mark.parametrize(
    "spec, extra, match",
    [
        ("vae.py", [], "is not MODULE:FACTORY"),
        ("missing.py:make_model", [], "does not exist"),
        ("broken.py:make_model", [], "cannot import broken.py (SyntaxError"),
        ("vae.py:nothing", [], "has no function nothing"),
        ("vae.py:raises", [], "raised RuntimeError: weights not found at s3://nowhere"),
        ("vae.py:unregistered", [], "shows no weights in its state_dict"),
        ("vae.py:not_a_model", [], "it has no propose"),
        ("vae.py:transposed", [], "expected a list of tensors of shape (K, B, D) = (3, 4, D)"),
        ("vae.py:unstable", [], "returns other weights on each call"),
        ("vae.py:make_model", ["--data", "narrow.npy"], "on data of width 10"),
        ("vae.py:make_model", ["--data", "grey.npy", "--binarize"], "values outside [0, 1]"),
        ("vae.py:make_model", ["--data", "two.npz"], "holds 2 arrays (a, b)"),
        ("vae.py:make_model", ["--data", "nothing.npy"], "does not exist"),
        ("vae.py:make_model", ["--name", "a/b"], "--name 'a/b'"),
        ("vae.py:make_model", ["--method", "ais", "--eval-k", "10"], "--eval-k does nothing with --method ais"),
        ("vae.py:make_model", ["--test-images", "20000"], "has 10000 images"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(capsys, monkeypatch, tmp_path, mnist_vae, mnist_dir, spec, extra, match):
    """Each bad input: exit 2, one line naming the fix, no results location made."""
    monkeypatch.chdir(mnist_vae)
    extra = [str(mnist_vae / e) if e.endswith((".npy", ".npz")) else e for e in extra]
    one_line(capsys, ["score", spec, *extra, "--results", tmp_path / "r", "--data-dir", mnist_dir], match)
    assert not (tmp_path / "r").exists()


def test_a_module_importable_from_here_is_scored_under_its_name(capsys, monkeypatch, ray_local, tmp_path, mnist_vae, mnist_dir):
    """MODULE as a module name importable from the current folder; MNIST binarised as Table 1's
    evaluation binarises it; the key carries the weights' digest, so new weights are a new model."""
    monkeypatch.chdir(mnist_vae)
    results = tmp_path / "r"
    argv = ["score", "vae:make_model", "--test-images", "12", "--eval-k", "20", "--results", results, "--data-dir", mnist_dir]
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    torch.save({"enc": torch.nn.Linear(784, 8).state_dict(), "dec": torch.nn.Linear(4, 784).state_dict()}, mnist_vae / "w.pt")
    assert main([str(a) for a in argv]) == 0
    capsys.readouterr()
    got = read_estimates(str(results), "eval", "k20-seed123-block500")
    assert got.groupby("run_id").size().tolist() == [12, 12] and all(r.startswith("vae-") and r.endswith("-mnist") for r in set(got.run_id))
    runs = pd.read_parquet(results / "tables" / "runs")
    assert set(runs.scored_model) == {"vae:make_model"} and set(runs.likelihood) == {"probability"}


def test_the_key_changes_with_the_code_and_a_file_module_imports_its_siblings(tmp_path):
    """A model's digest covers its module's code as well as its weights (a fixed log_joint is another
    model); a .py module finds the modules beside it; a folder that would shadow the project's own
    packages on the nodes is refused before anything is shipped."""
    from pipeline.errors import UserError
    from pipeline.user_models import build, check_folder, locate

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "nets.py").write_text("import torch\nenc, dec = torch.nn.Linear(6, 4), torch.nn.Linear(2, 6)\n")
    body = FAILING.replace("torch.manual_seed(0)\nenc, dec = torch.nn.Linear(6, 4), torch.nn.Linear(2, 6)", "torch.manual_seed(0)\nfrom nets import enc, dec")
    assert body != FAILING
    (folder / "sib.py").write_text(body)
    root, target = locate(f"{folder}/sib.py:make_model")
    _, before = build(target, root, torch.device("cpu"))
    (folder / "sib.py").write_text(body + "\n# a comment, or a fixed log_joint: the module's code changed\n")
    _, after = build(target, root, torch.device("cpu"))
    assert before != after
    check_folder(str(folder))  # nothing to refuse
    (folder / "pipeline.py").write_text("")
    with pytest.raises(UserError, match="would shadow this project's own package"):
        check_folder(str(folder))
