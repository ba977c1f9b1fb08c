"""Trainer: the loss goes down, DDP ranks stay identical, resume continues, checkpoints round-trip, CLI works."""
from __future__ import annotations

import json
import os
import socket

import pytest
import torch

from engine.train.trainer import Trainer, TrainConfig


def small_config(**changes) -> TrainConfig:
    """One person, one view group, micro model, 32 px: a few hundred ms per step on a CPU."""
    cfg = TrainConfig(model="micro", steps=4, resolution=32, n_identities=1, groups_per_identity=1,
                      sampler="video", background="plain", n_views=4, n_targets=2, max_inputs=2, max_pool=1,
                      val_every=0, val_identities=1, warmup_steps=0, lr=3e-3, render_backend="cpu")
    for k, v in changes.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture(scope="module")
def head():
    from engine.head import load_head

    return load_head()


def test_loss_goes_down_on_a_tiny_problem(head, tmp_path):
    torch.set_num_threads(2)
    trainer = Trainer(small_config(steps=30), tmp_path, head=head, progress=False)
    history = trainer.fit()["loss_history"]
    assert len(history) == 30
    first, last = sum(history[:5]) / 5, sum(history[-5:]) / 5
    assert last < 0.8 * first, (first, last)


def test_resume_continues_the_step_count(head, tmp_path):
    Trainer(small_config(steps=2), tmp_path, head=head, progress=False).fit()
    resumed = Trainer(small_config(steps=4), tmp_path, head=head, resume=True, progress=False)
    assert resumed.step == 2
    resumed.fit()
    assert resumed.step == 4
    rows = (tmp_path / "train_log.csv").read_text().strip().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]] == [1, 2, 3, 4]


def test_checkpoint_round_trip_with_validation_metadata(head, tmp_path):
    from engine.checkpoints import load_checkpoint

    trainer = Trainer(small_config(steps=1, val_every=1), tmp_path, head=head, command="pytest", progress=False)
    trainer.fit()
    model, meta = load_checkpoint(tmp_path)
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor.cpu()), name
    assert meta["steps"] == 1 and meta["command"] == "pytest" and meta["wall_s"] >= 0
    assert set(meta["validation"]["psnr"]) == {"1", "4", "8", "16"}
    assert all(5 < v < 60 for v in meta["validation"]["psnr"].values())
    assert meta["config"]["name"] == "micro" and meta["train_config"]["steps"] == 1
    assert list((tmp_path / "validation").glob("*.png"))
    on_disk = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert on_disk["validation"] == meta["validation"]  # flat JSON: contract keys at the top level
    assert {"config", "command", "steps", "wall_s", "validation"} <= set(on_disk)


def test_rank_shards_are_disjoint_and_cover_the_data(head, tmp_path):
    trainer = Trainer(small_config(n_identities=3, groups_per_identity=4), tmp_path, head=head, progress=False)
    streams = []
    for rank in (0, 1):
        trainer.rank, trainer.world = rank, 2
        it = trainer._indices()
        streams.append([next(it) for _ in range(6)])
    assert not set(streams[0]) & set(streams[1])
    assert sorted(streams[0] + streams[1]) == list(range(12))


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        trainer = Trainer(small_config(steps=3, n_identities=2, groups_per_identity=2), out, progress=False)
        assert trainer.distributed and trainer.world == world
        trainer.fit()
        torch.save({k: v.detach().cpu() for k, v in trainer.model.state_dict().items()},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_cpu_processes_end_with_identical_weights(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    initial = Trainer(small_config(steps=0), tmp_path / "fresh", progress=False).model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], initial[k]) for k in a)  # they did train


def test_cli_trains_and_writes_a_checkpoint(tmp_path, monkeypatch):
    from fastavatar_stream.cli import main

    import engine.train.trainer as training

    original = training.TrainConfig

    def patched(**kw):  # keep the CLI path but shrink the problem to test size
        cfg = original(**kw)
        small = small_config(steps=cfg.steps)
        small.model = kw.get("model", "micro")
        return small

    monkeypatch.setattr(training, "TrainConfig", patched)
    out = tmp_path / "ckpt"
    rc = main(["train", "--config", "micro", "--data", "synthetic", "--steps", "2", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    assert len(list(out.glob("*.safetensors"))) == 1 and len(list(out.glob("*.json"))) == 1
    meta = json.loads(next(out.glob("*.json")).read_text())
    assert meta["steps"] == 2 and "train" in meta["command"]
    # a second run into the same folder without --resume is a user error (exit 2)
    assert main(["train", "--config", "micro", "--steps", "2", "--out", str(out)]) == 2


def test_fine_tuning_starts_from_a_checkpoint_without_point_guidance(head, tmp_path):
    """A model trained before point guidance existed is a valid start: its tensors are copied, the new module
    keeps its zero-output init, and a checkpoint that does not fit is a clear error."""
    from engine.checkpoints import save_checkpoint
    from engine.errors import InputError
    from engine.model import MICRO, build_model

    torch.manual_seed(3)
    old = build_model(MICRO.replace(point_guidance=False))
    save_checkpoint(tmp_path / "old", old, metadata={})
    trainer = Trainer(small_config(steps=1, init_from=str(tmp_path / "old")), tmp_path / "new", head=head,
                      progress=False)
    assert trainer.initialised_from and all(k.startswith("point_guidance.") for k in trainer.initialised_from)
    for name, tensor in old.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[name], tensor), name
    save_checkpoint(tmp_path / "wide", build_model(MICRO.replace(dim=128, heads=2)), metadata={})
    with pytest.raises(InputError, match="do not fit"):
        Trainer(small_config(steps=1, init_from=str(tmp_path / "wide")), tmp_path / "x", head=head, progress=False)


@pytest.mark.parametrize("fusion", ["visibility", "concat"])
def test_fused_training_renders_carry_view_weights_only_with_visibility_fusion(head, tmp_path, monkeypatch, fusion):
    import engine.train.trainer as training

    weighted = []
    real = training.render_set
    monkeypatch.setattr(training, "render_set",
                        lambda gs, *a, **k: weighted.append(gs.seen is not None) or real(gs, *a, **k))
    Trainer(small_config(steps=2, fusion=fusion), tmp_path, head=head, progress=False).fit()
    assert weighted and all(w == (fusion == "visibility") for w in weighted)


def test_an_unknown_fusion_is_a_clear_error(head, tmp_path):
    from engine.errors import InputError

    with pytest.raises(InputError, match="unknown fusion"):
        Trainer(small_config(fusion="average"), tmp_path, head=head, progress=False)


def test_a_fine_tuned_checkpoint_records_every_stage_that_made_it(head, tmp_path):
    """The recipe of a checkpoint is written by the trainer: each stage's command, steps and time, the parent's
    stages first, and the totals summed from them."""
    first = Trainer(small_config(steps=2), tmp_path / "a", head=head, command="stage a", progress=False)
    first.fit()
    second = Trainer(small_config(steps=1, init_from=str(tmp_path / "a")), tmp_path / "b", head=head,
                     command="stage b", progress=False)
    second.fit()
    meta = json.loads((tmp_path / "b" / "model.json").read_text())
    assert [(h["command"], h["steps"]) for h in meta["history"]] == [("stage a", 2), ("stage b", 1)]
    assert meta["history"][1]["init_from"] == str(tmp_path / "a") and meta["history"][0]["init_from"] is None
    assert meta["steps_total"] == 3
    assert meta["wall_s_total"] == pytest.approx(sum(h["wall_s"] for h in meta["history"]), abs=0.11)
