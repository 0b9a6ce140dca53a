"""Training: the schedule, checkpoints that resume exactly, non-finite steps skipped and counted."""

import pytest
import torch

from iwae import checkpoint
from iwae.config import ModelConfig, RunConfig, ScheduleConfig
from iwae.data import synthetic
from iwae.train import FINAL, NonFiniteError, model_from_checkpoint, train

SMALL = ModelConfig(x_dim=784, latent=(4,), hidden_q=((16,),), hidden_p=((16,),))


def cfg(**kw):
    base = dict(dataset="synthetic", model=SMALL, objective={"name": "iwae", "k": 3}, schedule=ScheduleConfig(stages=2), train_subset=400)
    base.update(kw)
    return RunConfig(**base)


def test_paper_schedule():
    """8 stages of 3^i epochs at 1e-3 * 10^(-i/7): 3,280 epochs; the authors' rounded rates as option."""
    plan = ScheduleConfig().plan()
    assert [e for e, _ in plan] == [1, 3, 9, 27, 81, 243, 729, 2187] and ScheduleConfig().total_epochs == 3280
    assert plan[7][1] == pytest.approx(1e-4) and plan[1][1] == pytest.approx(1e-3 * 10 ** (-1 / 7))
    authors = [lr for _, lr in ScheduleConfig(authors_code=True).plan()]
    assert authors == pytest.approx([1e-3, 7.2e-4, 5.2e-4, 3.7e-4, 2.7e-4, 1.9e-4, 1.4e-4, 1e-4])
    assert ScheduleConfig(stages=3, epoch_scale=0.5).plan()[2][0] == 4
    assert ScheduleConfig(epochs=7, lr=1e-4).plan() == [(7, 1e-4)]


def test_run_id_is_a_stable_hash_of_the_config():
    """Equal configs share an id; any change gives a new one; the config round-trips through a dict."""
    assert cfg().run_id == cfg().run_id and cfg(seed=1).run_id != cfg().run_id
    assert RunConfig.from_dict(cfg().to_dict()) == cfg()


def test_resume_from_checkpoint_matches_an_uninterrupted_run(tmp_path):
    """Stopping after stage 0 and resuming gives bit-for-bit the same model as one straight run."""
    data = synthetic(n_train=400, n_test=10)
    straight = train(cfg(), data, tmp_path / "a")
    # interrupted: a one-stage run of the same config in the same folder, then the full one resumes
    c1 = cfg()
    part = train(c1, data, None)  # warm-up to show in-memory runs also work
    assert len(part.history) == 4
    train(cfg(schedule=ScheduleConfig(stages=1)), data, tmp_path / "tmp")  # other config, other dir
    run_dir = tmp_path / "b"
    train(c1, data, run_dir)
    (run_dir / FINAL).unlink()
    (run_dir / "latest.pt").unlink()
    (run_dir / "stage-01.pt").unlink()  # as if killed during stage 1
    resumed = train(c1, data, run_dir)
    assert resumed.resumed_from_epoch == 1
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]


def test_truncated_checkpoint_is_detected_and_redone(tmp_path):
    """A half-written checkpoint is never loaded: it is moved aside (kept) and that work is redone."""
    data = synthetic(n_train=400, n_test=10)
    run_dir = tmp_path / "r"
    train(cfg(), data, run_dir)
    raw = (run_dir / FINAL).read_bytes()
    (run_dir / FINAL).write_bytes(raw[: len(raw) // 3])
    with pytest.raises(checkpoint.CheckpointError, match="damaged"):
        model_from_checkpoint(checkpoint.load(run_dir / FINAL))
    again = train(cfg(), data, run_dir)
    assert again.resumed_from_epoch == 4 and (run_dir / FINAL).exists()
    model_from_checkpoint(checkpoint.load(run_dir / FINAL))
    kept = list(run_dir.glob("_damaged-final.pt.*"))
    assert len(kept) == 1 and kept[0].read_bytes() == raw[: len(raw) // 3]  # moved aside, never deleted


def test_a_checkpoint_that_cannot_be_read_now_is_not_discarded(tmp_path):
    """A read error (a network blip on object storage) propagates and touches nothing: only a blob
    that was read and does not load counts as damaged."""

    class Flaky(checkpoint.DirectoryCheckpoints):
        def read(self, name):
            if name == FINAL:
                raise OSError("connection reset")
            return super().read(name)

    data = synthetic(n_train=400, n_test=10)
    train(cfg(), data, tmp_path / "r")
    before = sorted(p.name for p in (tmp_path / "r").iterdir())
    with pytest.raises(OSError, match="connection reset"):
        train(cfg(), data, Flaky(tmp_path / "r"))
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == before


def test_foreign_checkpoint_is_refused(tmp_path):
    """A torch file that is not ours is refused; a pickle with code is refused by weights_only."""
    torch.save({"weights": torch.zeros(2)}, tmp_path / "x.pt")
    with pytest.raises(checkpoint.CheckpointError, match="not an iwae-pipeline checkpoint"):
        checkpoint.load(tmp_path / "x.pt")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"format": checkpoint.FORMAT, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(checkpoint.CheckpointError, match="damaged"):
        checkpoint.load(tmp_path / "evil.pt")


def test_non_finite_steps_are_skipped_and_counted(monkeypatch):
    """A NaN step leaves the parameters untouched and is counted; an epoch of them raises NonFiniteError
    in one line naming the run, and the last checkpoint is kept."""
    import iwae.pack as P

    data = synthetic(n_train=400, n_test=10)
    original = P.Pack.train_epoch

    def poisoned(self, *args, **kwargs):  # every parameter NaN: every step of the epoch is non-finite
        with torch.no_grad():
            self.flat.fill_(float("nan"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(P.Pack, "train_epoch", poisoned)
    one_stage = cfg(schedule=ScheduleConfig(stages=1))
    with pytest.raises(NonFiniteError, match=f"run {one_stage.run_id}: 20 of 20 steps were non-finite in epoch 1"):
        train(one_stage, data)
    monkeypatch.undo()
    state = P.start_state(cfg(), data, torch.device("cpu"), None, None)[0]
    pack = P.Pack([state], torch.as_tensor(data.train[:400]))
    before = pack.flat.detach().clone()
    pack.u.fill_(0.5)
    with torch.no_grad():
        pack.eps[0].fill_(float("nan"))  # one step's noise NaN: its bound and gradient are not finite
    pack.lr.fill_(1e-3)
    pack.idx.copy_(torch.arange(20)[None])
    pack.flat.grad = None
    pack._step()
    assert torch.equal(pack.flat.detach(), before) and pack.skipped.tolist() == [1.0] and float(pack.adam.steps[0]) == 0.0


def test_a_run_moves_between_devices_mid_schedule(tmp_path):
    """CPU -> another device -> CPU: a checkpoint whose random state is another device's generator's (a
    CUDA state, seed and offset) resumes here with draws reseeded from (seed, epoch) and one notice,
    and the run finishes; a checkpoint from this device resumes its stream exactly, without one."""
    from iwae.state import epoch_seed, restore_rng

    data = synthetic(n_train=400, n_test=10)
    c = cfg()
    sink = checkpoint.DirectoryCheckpoints(tmp_path / "r")
    train(cfg(schedule=ScheduleConfig(stages=1)), data, None)  # another run; the one below trains epoch 1 on this CPU
    ck = None
    for name in ("latest.pt",):
        train(c, data, sink, progress=False)  # all 4 epochs on the CPU
        ck = checkpoint.load(tmp_path / "r" / name)
    assert ck is not None and ck["rng_device"] == "cpu"
    for name in ("final.pt", "latest.pt", "stage-01.pt"):
        (tmp_path / "r" / name).unlink()  # back to the end of stage 0 (epoch 1)
    stage0 = checkpoint.load(tmp_path / "r" / "stage-00.pt")
    moved = {**stage0, "rng": torch.tensor([7] * 8 + [0] * 8, dtype=torch.uint8), "rng_device": "cuda"}  # as a GPU would have saved it
    (tmp_path / "r" / "stage-00.pt").write_bytes(checkpoint.to_bytes({k: v for k, v in moved.items() if k != "format"}))
    notes: list[str] = []
    resumed = train(c, data, sink, progress=False, notice=notes.append)
    assert resumed.resumed_from_epoch == 1 and [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    assert len(notes) == 1 and "a cuda generator's and this is a cpu" in notes[0] and "epoch 1" in notes[0], notes
    assert checkpoint.load(tmp_path / "r" / FINAL)["rng_device"] == "cpu"
    gen = torch.Generator()
    assert restore_rng(gen, moved, c, 1) and torch.equal(gen.get_state(), torch.Generator().manual_seed(epoch_seed(c.seed, 1)).get_state())
    assert restore_rng(gen, stage0, c, 1) == "" and torch.equal(gen.get_state(), stage0["rng"])  # same device: the exact stream
    old = {k: v for k, v in stage0.items() if k != "rng_device"}  # checkpoints from before the device was recorded: told by size
    assert restore_rng(torch.Generator(), old, c, 1) == ""


def test_history_has_per_epoch_metrics():
    """Each epoch reports its bound, time, throughput and skipped steps as data."""
    res = train(cfg(), synthetic(n_train=400, n_test=10))
    row = res.history[-1]
    assert set(row) >= {"epoch", "stage", "lr", "train_bound", "seconds", "examples_per_s", "skipped_steps"}
    assert row["skipped_steps"] == 0 and row["train_bound"] < 0
    assert res.history[-1]["train_bound"] > res.history[0]["train_bound"]  # it learns
