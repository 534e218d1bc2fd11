"""The trainer under torchrun: two CPU processes on gloo share the consumer group's partitions, join
each session locally, train DistributedDataParallel models in lockstep, and rank 0 publishes."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from fuseloop.bus import TopicConfig
from fuseloop.bus.sqlite import SqliteBus, SqliteBusConfig
from fuseloop.checkpoint import Checkpoint
from fuseloop.events import new_id
from fuseloop.repository import ModelRepository
from fuseloop.scenes import make_examples, png_bytes, render
from tests.traffic_factory import publish_traffic
from trainer.batches import ContextTensors
from trainer.distributed import GlooGroup, check_copartitioned, state_sha256
from trainer.policy_gradient import PolicyGradientConfig, train_policy
from trainer.reward_training import RewardTrainConfig, train_reward
from trainer.signals import Context, TrainingSet

TORCHRUN = Path(sys.executable).parent / "torchrun"
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rows(db: Path, sql: str) -> list:
    con = sqlite3.connect(str(db))
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_a_sessions_events_land_on_the_same_partition_number_and_member_when_partitions_divide(tmp_path):
    topics = TopicConfig()
    sessions = [new_id().encode() for _ in range(40)]
    for partitions, lined_up in ((4, True), (3, False)):
        bus = SqliteBus(SqliteBusConfig(str(tmp_path / f"bus-{partitions}.db"), partitions=partitions))
        for topic in (topics.inference, topics.feedback):
            bus.publish_many(topic, [(s, b"x") for s in sessions])
        placed = rows(Path(bus.config.path), "SELECT topic, key, part FROM log")
        by_key = {}
        for topic, key, part in placed:
            by_key.setdefault(bytes(key), set()).add(part)
        assert all(len(parts) == 1 for parts in by_key.values())  # crc32(key) % partitions, whatever the topic
        members = [bus.consumer("g", [topics.inference, topics.feedback]) for _ in range(2)]
        try:
            for m in members:
                by_topic = {t: {p for tt, p in m.position() if tt == t} for t in (topics.inference, topics.feedback)}
                assert (by_topic[topics.inference] == by_topic[topics.feedback]) == lined_up
        finally:
            for m in members:
                m.close()
        if not lined_up:
            with pytest.raises(SystemExit, match="multiple of 2"):
                check_copartitioned(bus, 2)
        bus.close()


def _uneven_rank(rank: int, port: int, run_dir: str, out_dir: str) -> None:
    """Rank 0 holds pairs, ratings, corrections and prompts; rank 1 holds nothing at all."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      GLOO_SOCKET_IFNAME="lo", TQDM_DISABLE="1")
    torch.set_num_threads(1)
    group = GlooGroup()
    ckpt = Checkpoint.load(Path(run_dir))
    ctx = [Context(e.prompt, png_bytes(render(e.scene)), f"r{rank}-{i}")
           for i, e in enumerate(make_examples(24, seed=rank))]
    data = TrainingSet()
    if rank == 0:
        data.pairs = [(c, "red", "blue", 1.0) for c in ctx]
        data.ratings = [(c, "two", 4, 1.0) for c in ctx]
        data.demos = [(c, "one") for c in ctx[:4]]
    tensors = ContextTensors(ckpt.preprocessor)
    train_reward(ckpt.reward, group.align_signals(data, 0.15), tensors,
                 RewardTrainConfig(steps=3, batch_size=16, seed=rank), wrap=group.wrap)
    prompts = group.nonempty(ctx if rank == 0 else [])
    reference = ckpt.family.build(ckpt.model_config)
    train_policy(ckpt.family, ckpt.policy, reference, ckpt.reward, prompts, data.demos, tensors,
                 PolicyGradientConfig(steps=2, prompts_per_step=4, samples_per_prompt=2, demo_batch=4, seed=rank),
                 wrap=group.wrap, reduce_mean=group.mean)
    Path(out_dir, f"{rank}.json").write_text(json.dumps(
        {"policy": state_sha256(ckpt.policy), "reward": state_sha256(ckpt.reward)}))
    group.close()


def test_a_rank_without_data_takes_the_same_steps_and_ends_identical(quick_run_dir, tmp_path):
    mp.spawn(_uneven_rank, args=(free_port(), str(quick_run_dir), str(tmp_path)), nprocs=2, join=True)
    states = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    assert states[0] == states[1]
    assert states[0]["policy"] != state_sha256(Checkpoint.load(quick_run_dir).policy)  # it did train


@pytest.mark.slow
def test_two_ranks_share_the_partitions_stay_in_lockstep_and_rank0_publishes(quick_checkpoint, repo_copy, tmp_path):
    bus_path = tmp_path / "bus.db"
    bus = SqliteBus(SqliteBusConfig(str(bus_path), partitions=4))
    traffic = publish_traffic(bus, TopicConfig(), quick_checkpoint, requests=160, users=16)
    inference, feedback = traffic.inference, traffic.feedback
    bus.close()

    workdir = tmp_path / "trainer"
    cmd = [str(TORCHRUN), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "trainer.distributed", "--repo", str(repo_copy), "--bus", f"sqlite://{bus_path}",
           "--workdir", str(workdir), "--rm-steps", "8", "--pg-steps", "3", "--min-reward-gain=-1e9"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "TQDM_DISABLE": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]

    ranks = [workdir / f"rank-{r}" for r in (0, 1)]
    dbs = [r / "dataset.db" for r in ranks]
    # Each rank read its own partitions, and together every event exactly once.
    parts = [{(t, p) for t, p, _ in rows(db, "SELECT * FROM offsets")} for db in dbs]
    assert parts[0] and parts[1] and not parts[0] & parts[1]
    inf_ids = [{e for (e,) in rows(db, "SELECT event_id FROM seen_inference")} for db in dbs]
    fb_ids = [{e for (e,) in rows(db, "SELECT event_id FROM feedback")} for db in dbs]
    assert not inf_ids[0] & inf_ids[1] and inf_ids[0] | inf_ids[1] == {e.event_id for e in inference}
    assert not fb_ids[0] & fb_ids[1] and fb_ids[0] | fb_ids[1] == {e.event_id for e in feedback}
    # Sessions joined locally: no feedback waits for an inference event held by the other rank.
    reports = [json.loads((r / "round-001.json").read_text()) for r in ranks]
    assert [rep["unjoined_waiting"] + rep["unjoined_dead_lettered"] for rep in reports] == [0, 0]

    # Parameters stayed identical across ranks, and are what rank 0 published, with lineage.
    states = [json.loads((r / "state-round-001.json").read_text()) for r in ranks]
    assert states[0]["policy_sha256"] == states[1]["policy_sha256"]
    assert states[0]["reward_model_sha256"] == states[1]["reward_model_sha256"]
    repo = ModelRepository(repo_copy)
    assert repo.latest() == 3 and states[0]["version"] == states[1]["version"] == 3
    published = Checkpoint.load(repo.checkpoint_dir(3))
    assert state_sha256(published.policy) == states[0]["policy_sha256"]
    assert state_sha256(published.reward) == states[0]["reward_model_sha256"]
    lineage = repo.manifest(3).lineage
    assert lineage["parent_version"] == 2
    assert lineage["inference_events"] == len(inference)
    assert lineage["new_feedback_events"] == len(feedback)
    assert set(lineage["store_offsets"]) == {f"{t}/{p}" for t, p in parts[0] | parts[1]}


def test_each_rank_takes_fuseloop_trains_config_in_its_own_workdir_with_its_own_seeds(tmp_path):
    """`python -m trainer.distributed` reads the same --config / --set / step flags as
    `fuseloop train` (the last word wins), so a team's TOML file runs unchanged under torchrun."""
    from trainer.distributed import build_parser, rank_config

    toml = tmp_path / "train.toml"
    toml.write_text("min_new_feedback = 5\n[policy]\nkl_beta = 0.07\nsteps = 11\n[reward]\nlr = 3e-4\n")
    args = build_parser().parse_args(["--repo", "R", "--bus", "sqlite:///b.db", "--workdir", str(tmp_path / "w"),
                                      "--config", str(toml), "--set", "policy.kl_beta=0.09", "--rm-steps", "7",
                                      "--min-reward-gain=-1"])
    configs = [rank_config(args, rank) for rank in (0, 1)]
    for rank, config in enumerate(configs):
        assert config.workdir == tmp_path / "w" / f"rank-{rank}"
        assert (config.policy.kl_beta, config.policy.steps, config.reward.steps, config.reward.lr) == (0.09, 11, 7, 3e-4)
        assert config.min_new_feedback == 5 and config.gate.min_reward_gain == -1
    assert configs[1].policy.seed == configs[0].policy.seed + 1
    assert configs[1].reward.seed == configs[0].reward.seed + 1
