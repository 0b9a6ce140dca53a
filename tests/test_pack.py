"""Packed training: member g of a pack trains as its solo run does (iwae.pack)."""

import pytest
import torch

from iwae import checkpoint
from iwae.config import ModelConfig, RunConfig, ScheduleConfig
from iwae.data import synthetic
from iwae.pack import Pack, PackedAdam, group_packs, pack_key, train_pack
from iwae.train import FINAL, _StepBound, start_state, train, train_epoch

SMALL = ModelConfig(x_dim=784, latent=(4,), hidden_q=((16,),), hidden_p=((16,),))
TWO = ModelConfig(x_dim=784, latent=(4, 3), hidden_q=((16,), (8,)), hidden_p=((16,), (8,)))


def cfg(**kw):
    base = dict(dataset="synthetic", model=SMALL, objective={"name": "iwae", "k": 3}, schedule=ScheduleConfig(stages=2), train_subset=200)
    base.update(kw)
    return RunConfig(**base)


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_packed_adam_equals_torch_adam():
    """PackedAdam with one member follows torch.optim.Adam step for step (the pack's optimiser is Adam)."""
    torch.manual_seed(0)
    p_ref = torch.randn(5, 3, requires_grad=True)
    ref = torch.optim.Adam([p_ref], lr=1e-3, betas=(0.9, 0.999), eps=1e-4)
    p = p_ref.detach().clone()[None]  # (1, 5, 3)
    adam = PackedAdam([torch.zeros_like(p)], [torch.zeros_like(p)], torch.zeros(1), (0.9, 0.999), 1e-4)
    for _ in range(5):
        g = torch.randn(5, 3)
        p_ref.grad = g.clone()
        ref.step()
        adam.step([p], [g[None]], torch.tensor([1e-3]), torch.tensor([True]))
    torch.testing.assert_close(p[0], p_ref.detach(), rtol=1e-6, atol=1e-7)


def test_packed_adam_skips_a_non_finite_member_only():
    """A member with a NaN gradient keeps its parameters, moments and step; the other member steps."""
    p = torch.ones(2, 3)
    adam = PackedAdam([torch.zeros_like(p)], [torch.zeros_like(p)], torch.zeros(2), (0.9, 0.999), 1e-4)
    g = torch.stack([torch.full((3,), float("nan")), torch.ones(3)])
    adam.step([p], [g], torch.tensor([1e-3, 1e-3]), torch.tensor([False, True]))
    assert torch.equal(p[0], torch.ones(3)) and torch.all(p[1] < 1)
    assert adam.step_count.tolist() == [0.0, 1.0] and torch.equal(adam.exp_avg[0][0], torch.zeros(3))


def _one_step_solo(c, data):
    """The solo run's first training step, through iwae.train's own epoch loop cut to one batch."""
    state, _ = start_state(c, data, torch.device("cpu"), None, None)
    x = torch.as_tensor(data.train[: c.schedule.batch_size])  # one batch: train_epoch runs one step
    train_epoch(state, x, _StepBound(state.model, c.objective, c.estimator, False))
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
