"""Recipe: the whole loop on one machine. Pretrain -> export v1 -> start the inference and
feedback services -> simulated users -> N rounds of train, gate, redeploy while traffic goes on."""

from __future__ import annotations

import json
import secrets
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from tqdm import tqdm

from demo.report import print_round_table, write_report_png
from demo.simulated_users import UserModel
from demo.traffic import Traffic
from fuseloop.bus import TopicConfig
from fuseloop.bus.url import open_bus
from fuseloop.checkpoint import Checkpoint
from fuseloop.config_file import build
from fuseloop.repository import ModelRepository
from fuseloop.scenes import SceneTaskConfig, make_split, png_bytes, render
from trainer.deploy import AdminDeployer
from trainer.eval_set import EvalItem, EvalSet, write_eval_set
from trainer.export import publish
from trainer.pretrain import PretrainConfig, pretrain
from trainer.round import TrainConfig, Trainer


@dataclass
class DemoConfig:
    rounds: int = 3
    users: int = 6
    requests_per_round: int = 1200
    bus: str | None = None  # default: an embedded SQLite bus under `out`
    out: Path = Path("demo-out")
    gold_examples: int = 400
    seed: int = 0
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    train: dict = field(default_factory=dict)  # TrainConfig overrides
    train_file: dict = field(default_factory=dict)  # TrainConfig fields from a TOML file, applied over `train`
    user_model: UserModel = field(default_factory=UserModel)
    training_think_s: float = 0.25  # users slow down while a round trains (2 cores are shared)

    @classmethod
    def quick(cls, out: Path) -> "DemoConfig":
        """Small settings for tests: one round, about three minutes. The base keeps its full
        pretraining: a base too weak to tie a question to the right object gives users' feedback
        nothing systematic to correct."""
        from trainer.policy_gradient import PolicyGradientConfig
        from trainer.reward_training import RewardTrainConfig

        return cls(rounds=1, users=4, requests_per_round=500, out=out, gold_examples=300,
                   pretrain=replace(PretrainConfig(), n_test=200),
                   train={"reward": RewardTrainConfig(steps=200), "policy": PolicyGradientConfig(steps=30)})


def run_demo(cfg: DemoConfig, log=print) -> dict:
    from services.feedback.server import FeedbackServer, FeedbackServiceConfig
    from services.inference.config import InferenceServiceConfig
    from services.inference.runtime.onnx_runtime import OnnxRuntime, OnnxRuntimeConfig
    from services.inference.server import InferenceServer, ServerThread

    t_start = time.perf_counter()
    out = Path(cfg.out)
    # Checked before two minutes of pretraining; the demo keeps its trainer under `out`.
    train_config = build(TrainConfig, {**cfg.train_file, "workdir": str(out / "trainer")},
                         base=TrainConfig(workdir=out / "trainer", **cfg.train))
    out.mkdir(parents=True, exist_ok=True)
    run_dir, repo = out / "base-run", ModelRepository(out / "model-repository")
    if repo.versions():
        raise SystemExit(f"{repo.root} already has versions: pass a fresh --out")
    log(f"[1/4] pretraining the base policy and reward model -> {run_dir}")
    base_metrics = pretrain(cfg.pretrain, run_dir)
    ckpt = Checkpoint.load(run_dir)
    log("[2/4] exporting version 1 (ONNX, Triton layout)")
    publish(ckpt, repo, metrics=base_metrics, lineage={"source": "pretrain"})

    task = SceneTaskConfig(image_size=ckpt.preprocessor.config.image_size)
    # The gold oracle, written out as an eval set: the demo gates exactly as production would.
    eval_path = out / "eval-set.jsonl"
    write_eval_set(eval_path, [EvalItem(png_bytes(render(e.scene, task)), e.prompt, (e.answer,),
                                        "clauses" if e.kind == "describe" else "normalized")
                               for e in make_split("test", cfg.gold_examples, task)])
    eval_set = EvalSet.from_file(eval_path)
    base_gold = eval_set.accuracy(ckpt.family, ckpt.policy, ckpt.preprocessor)
    bus_url = cfg.bus or f"sqlite:///{(out / 'bus.db').resolve()}"
    bus = open_bus(bus_url, client_id="fuseloop-demo", spool_dir=str(out / "spool"))
    topics = TopicConfig()
    admin_token, app_token = secrets.token_hex(16), secrets.token_hex(16)
    log(f"[3/4] starting the services on the {bus_url.split(':')[0]} bus")
    inference = ServerThread(InferenceServer(
        InferenceServiceConfig(port=0, admin_token=admin_token, topics=topics),
        OnnxRuntime(OnnxRuntimeConfig(intra_op_threads=1, allow_spinning=False)), repo, bus)).start()
    feedback = FeedbackServer(FeedbackServiceConfig(app_tokens={app_token: "demo-app"},
                                                    pseudonym_key=secrets.token_bytes(32), port=0, topics=topics),
                              bus).start()
    traffic = Traffic(inference.address, feedback.address, app_token, cfg.users, cfg.user_model, task, cfg.seed)
    trainer = Trainer(train_config, bus, repo, topics,
                      deployer=AdminDeployer(inference.address, admin_token), eval_set=eval_set)
    rounds = []
    try:
        traffic.start()
        log(f"[4/4] {cfg.rounds} rounds of traffic -> train -> gate -> redeploy (base gold accuracy {base_gold:.3f})")
        for r in range(1, cfg.rounds + 1):
            traffic.think_s = 0.0
            with tqdm(total=cfg.requests_per_round, desc=f"round {r}: live traffic", unit="req") as bar:
                while (n := traffic.requests_so_far()) < cfg.requests_per_round:
                    bar.update(n - bar.n)
                    time.sleep(0.5)
                bar.update(cfg.requests_per_round - bar.n)
            window = traffic.take_window()
            traffic.think_s = cfg.training_think_s
            report = trainer.run_round()
            rounds.append(round_row(report, window.summary()))
            print_round_table(rounds, base_gold, log)
    finally:
        traffic.stop()
        trainer.close()
        feedback.stop()
        inference.stop()
        bus.close()
    result = {"base_gold_accuracy": base_gold, "final_gold_accuracy": rounds[-1]["gold_accuracy"] if rounds else base_gold,
              "rounds": rounds, "base": {k: base_metrics[k] for k in ("policy_parameters", "train_seconds")},
              "seconds": round(time.perf_counter() - t_start, 1), "out": str(out), "bus": bus_url}
    write_report_png(out / "report.png", result)
    (out / "demo.json").write_text(json.dumps(result, indent=2))
    return result


def round_row(report: dict, traffic: dict) -> dict:
    rm = report.get("reward_model", {}).get("after", {})
    return {"round": report["round"], "version": report.get("version") or report["parent_version"],
            "deployed": bool(report["deployed"]), "gold_accuracy": report.get("gold_accuracy"),
            "kl": report.get("policy", {}).get("kl"), "rm_pairwise_accuracy": rm.get("pairwise_accuracy"),
            "events": traffic["events"], "requests": traffic["requests"], "errors": traffic["errors"],
            "live_accuracy": traffic["live_accuracy"], "p50_ms": traffic["p50_ms"], "p99_ms": traffic["p99_ms"],
            "train_seconds": report["seconds"], "gate": report.get("gate", {}).get("reasons", []),
            "skipped": report.get("skipped")}
