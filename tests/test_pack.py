"""The one training loop (iwae.pack): a run alone is a pack of one, equal to the loop written out by
hand; member g of a pack trains as it does alone; Adam on the flat buffer is torch's, per member."""

import pytest
import torch

from iwae import checkpoint
from iwae.config import ModelConfig, RunConfig, ScheduleConfig
from iwae.data import binarize, synthetic
from iwae.estimators import bound_and_surrogate
from iwae.pack import FlatAdam, Pack, group_packs, pack_key, train_pack
from iwae.state import FINAL, start_state
from iwae.train import train

SMALL = ModelConfig(x_dim=784, latent=(4,), hidden_q=((16,),), hidden_p=((16,),))
TWO = ModelConfig(x_dim=784, latent=(4, 3), hidden_q=((16,), (8,)), hidden_p=((16,), (8,)))


def cfg(**kw):
    base = dict(dataset="synthetic", model=SMALL, objective={"name": "iwae", "k": 3}, schedule=ScheduleConfig(stages=2), train_subset=200)
    base.update(kw)
    return RunConfig(**base)


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_flat_adam_equals_torch_adam_per_member_with_its_own_steps_and_skips():
    """Two members on one flat buffer, one of them 3 steps ahead (resumed at another epoch) and with
    another lr: each follows its own torch.optim.Adam step for step; a member whose step is skipped
    (non-finite) keeps its parameters, moments and step count while the other steps."""
    torch.manual_seed(0)
    refs = [torch.randn(7, requires_grad=True) for _ in range(2)]
    opts = [torch.optim.Adam([r], lr=lr, betas=(0.9, 0.999), eps=1e-4) for r, lr in zip(refs, (1e-3, 3e-3))]
    for _ in range(3):  # member 0 is 3 steps ahead
        refs[0].grad = torch.randn(7)
        opts[0].step()
    flat = torch.stack([r.detach().clone() for r in refs])  # (2, 7)
    m = torch.stack([opts[0].state[refs[0]]["exp_avg"], torch.zeros(7)])
    v = torch.stack([opts[0].state[refs[0]]["exp_avg_sq"], torch.zeros(7)])
    adam = FlatAdam(m, v, [torch.tensor(3.0), torch.tensor(0.0)], (0.9, 0.999), 1e-4)
    lr = torch.tensor([1e-3, 3e-3])
    for step in range(5):
        g = torch.randn(2, 7)
        skip = torch.tensor([1.0, 0.0]) if step == 2 else torch.zeros(2)  # member 0's third step here is non-finite
        if step == 2:
            g[0] = float("nan")
            kept = flat[0].clone(), adam.exp_avg[0].clone(), float(adam.steps[0])
        else:
            refs[0].grad = g[0].clone()
            opts[0].step()
        refs[1].grad = g[1].clone()
        opts[1].step()
        adam.step(flat, g, lr, skip)
        if step == 2:
            assert torch.equal(flat[0], kept[0]) and torch.equal(adam.exp_avg[0], kept[1]) and float(adam.steps[0]) == kept[2]
    for r, o, row, steps in zip(refs, opts, flat, adam.steps):
        torch.testing.assert_close(row, r.detach(), rtol=1e-6, atol=1e-7)
        assert float(steps) == float(o.state[r]["step"])
    assert [float(s) for s in adam.steps] == [7.0, 5.0]


def _reference_epoch(c, data, steps):
    """A run's first ``steps`` steps written out by hand: its generator draws the data order, then per
    step the binarisation and the noise; Adam is torch.optim.Adam. The training loop must equal this."""
    state = start_state(c, data, torch.device("cpu"), None, None)[0]
    model, gen, bs = state.model, state.gen, c.schedule.batch_size
    x_train = torch.as_tensor(data.train[: c.train_subset])
    order = torch.randperm(x_train.shape[0], generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=c.schedule.plan()[0][1], betas=(0.9, 0.999), eps=1e-4)
    for i in range(steps):
        x = binarize(x_train[order[i * bs : (i + 1) * bs]], gen)
        eps = [torch.randn((c.objective.num_samples, bs, d), generator=gen) for d in c.model.latent]
        _, surrogate = bound_and_surrogate(model, x, c.objective, c.estimator.value, eps=eps)
        opt.zero_grad()
        (-surrogate.mean()).backward()
        opt.step()
    return model


@pytest.mark.parametrize("estimator", ["standard", "dreg"])
def test_a_run_alone_equals_the_loop_written_out_by_hand(estimator):
    """A pack of one (the one training loop) takes exactly the steps of the loop written out by hand:
    same draws in the same order, same gradient (standard, or DReG through its surrogate), same Adam."""
    data = synthetic(n_train=200, n_test=10)
    c = cfg(estimator=estimator, train_subset=100)
    state = start_state(c, data, torch.device("cpu"), None, None)[0]
    Pack([state], torch.as_tensor(data.train[:100])).train_epoch()  # 100 images: 5 steps
    ref = _reference_epoch(c, data, 5)
    for (n, p), q in zip(ref.named_parameters(), state.model.parameters()):
        torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-5, atol=1e-6, msg=n)


def _one_step_solo(c, data):
    """The run's first training step alone: a pack of one, cut to one batch."""
    state, _ = start_state(c, data, torch.device("cpu"), None, None)
    Pack([state], torch.as_tensor(data.train[: c.schedule.batch_size])).train_epoch()  # one batch: one step
    return state


@pytest.mark.parametrize("members", [("vae", 0, "iwae", 0), ("iwae", 0, "iwae", 1)])
def test_pack_equals_solo_after_one_step(members):
    """VAE and IWAE members in one pack (and two seeds of one objective) take the solo runs' first step."""
    data = synthetic(n_train=200, n_test=10)
    cfgs = [cfg(objective={"name": members[0], "k": 3}, seed=members[1]), cfg(objective={"name": members[2], "k": 3}, seed=members[3])]
    x = torch.as_tensor(data.train[: cfgs[0].schedule.batch_size])
    states = [start_state(c, data, torch.device("cpu"), None, None)[0] for c in cfgs]
    before = [_params(s.model) for s in states]
    Pack(states, x).train_epoch()
    for c, s, b in zip(cfgs, states, before):
        solo = _one_step_solo(c, data)
        moved = False
        for n, p in solo.model.named_parameters():
            # atol: 1% of the first step (lr 1e-3); Adam's first step is lr*g/(|g|+eps), so where |g| ~ eps
            # the batched matmul's other summation order shows; a wrong member or stream moves it by ~lr
            torch.testing.assert_close(dict(s.model.named_parameters())[n].detach(), p.detach(), rtol=1e-5, atol=1e-5)
            moved |= not torch.equal(p.detach(), b[n])
        assert moved  # the step did something: a pack that never updated would fail the comparison
        assert s.history[0]["train_bound"] == pytest.approx(solo.history[0]["train_bound"], rel=1e-5)
        # the Adam state a checkpoint saves is the solo format and values
        for ps, pp in zip(solo.model.parameters(), s.model.parameters()):
            ref = solo.opt.state[ps]["exp_avg_sq"]
            torch.testing.assert_close(s.opt.state[pp]["exp_avg_sq"], ref, rtol=1e-3, atol=1e-4 * float(ref.max()))
            assert float(s.opt.state[pp]["step"]) == float(solo.opt.state[ps]["step"]) == 1.0


def test_pack_of_two_layer_models_equals_solo():
    """The two-stochastic-layer model packs too (both layers' noise from each member's stream)."""
    data = synthetic(n_train=200, n_test=10)
    cfgs = [cfg(model=TWO, seed=0), cfg(model=TWO, objective={"name": "vae", "k": 3}, seed=3)]
    x = torch.as_tensor(data.train[:20])
    states = [start_state(c, data, torch.device("cpu"), None, None)[0] for c in cfgs]
    Pack(states, x).train_epoch()
    for c, s in zip(cfgs, states):
        solo = _one_step_solo(c, data)
        for (n, p), q in zip(solo.model.named_parameters(), s.model.parameters()):
            torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-5, atol=1e-5, msg=n)


def test_pack_matches_solo_statistics_after_an_epoch():
    """After whole epochs each member's bound is the solo run's (float drift only, far below the VAE-IWAE gap)."""
    data = synthetic(n_train=200, n_test=10)
    cfgs = [cfg(objective={"name": "vae", "k": 3}), cfg(), cfg(seed=1)]
    packed = train_pack(cfgs, data, [None] * 3, progress=False)
    for c, r in zip(cfgs, packed):
        solo = train(c, data, None, progress=False, compile_step=False)
        assert not isinstance(r, Exception)
        assert [h["epoch"] for h in r.history] == [1, 2, 3, 4]
        for hp, hs in zip(r.history, solo.history):
            assert hp["train_bound"] == pytest.approx(hs["train_bound"], abs=1e-3)


def test_pack_resumes_members_from_their_own_checkpoints(tmp_path):
    """A member trained solo to the end is not retrained; one killed mid-run resumes from its own
    latest.pt; the result equals an uninterrupted pack; checkpoints are the solo format."""
    data = synthetic(n_train=200, n_test=10)
    a, b, c = cfg(seed=0), cfg(seed=1), cfg(objective={"name": "vae", "k": 3}, seed=2)
    sinks = {x.run_id: checkpoint.DirectoryCheckpoints(tmp_path / x.run_id) for x in (a, b, c)}
    straight = train_pack([b, c], data, [None, None])
    train(a, data, sinks[a.run_id], progress=False, compile_step=False)  # finished solo
    train_pack([b], data, [sinks[b.run_id]])
    for name in (FINAL, "latest.pt", "stage-01.pt"):  # b killed after its first stage
        (tmp_path / b.run_id / name).unlink()
    seen: list[tuple[int, int]] = []
    out = train_pack([a, b, c], data, [sinks[x.run_id] for x in (a, b, c)], on_epoch=lambda g, row: seen.append((g, row["epoch"])))
    assert [g for g, _ in seen if g == 0] == []  # a: already done
    assert sorted(e for g, e in seen if g == 1) == [2, 3, 4] and sorted(e for g, e in seen if g == 2) == [1, 2, 3, 4]
    assert out[1].resumed_from_epoch == 1 and out[0].resumed_from_epoch == 4
    for r, s in zip(out[1:], straight):
        for p, q in zip(r.model.parameters(), s.model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-4)
    solo_ck = checkpoint.from_bytes(sinks[a.run_id].read(FINAL))
    pack_ck = checkpoint.from_bytes(sinks[c.run_id].read(FINAL))
    assert solo_ck.keys() == pack_ck.keys() and solo_ck["optimizer"]["param_groups"][0].keys() == pack_ck["optimizer"]["param_groups"][0].keys()
    resumed_solo = train(c, data, sinks[c.run_id], progress=False)  # a solo run reads a pack's checkpoint
    assert resumed_solo.resumed_from_epoch == 4


def test_pack_keys_group_runs_of_one_shape():
    """Objectives of one K and seeds pack together; another K, or STL, trains apart."""
    runs = [cfg(), cfg(seed=1), cfg(objective={"name": "vae", "k": 3}), cfg(objective={"name": "iwae", "k": 5}), cfg(estimator="stl")]
    assert pack_key(runs[4]) is None
    assert [len(p) for p in group_packs(runs, 8)] == [1, 3, 1]
    assert [len(p) for p in group_packs(runs, 2)] == [1, 2, 1, 1]
    with pytest.raises(ValueError, match="one shape"):
        Pack.fresh(runs[2:4], torch.zeros(20, 784))
