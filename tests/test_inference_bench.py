"""`fuseloop bench inference`'s pure parts: the rows MLServer gets, the goals and the table."""

from dataclasses import asdict

import numpy as np

from services.inference.bench import Cell, goals, same_widths, table


def test_same_widths_pads_every_ids_and_mask_pair_to_the_widest_row():
    rows = [{"pixel_values": np.zeros((1, 3)), "prompt_ids": np.array([[5, 6]]), "prompt_mask": np.array([[1, 1]]),
             "response_ids": np.array([[7, 8, 9]]), "response_mask": np.array([[1, 1, 1]])},
            {"pixel_values": np.ones((1, 3)), "prompt_ids": np.array([[5, 6, 4]]), "prompt_mask": np.array([[1, 1, 1]]),
             "response_ids": np.array([[7]]), "response_mask": np.array([[1]])}]
    out = same_widths(rows, pad_id=0)
    np.testing.assert_array_equal(out[0]["prompt_ids"], [[5, 6, 0]])
    np.testing.assert_array_equal(out[0]["prompt_mask"], [[1, 1, 0]])
    np.testing.assert_array_equal(out[1]["response_ids"], [[7, 0, 0]])
    np.testing.assert_array_equal(out[1]["response_mask"], [[1, 0, 0]])
    np.testing.assert_array_equal(out[1]["pixel_values"], rows[1]["pixel_values"])
    assert rows[0]["prompt_ids"].shape == (1, 2)  # the inputs are left as they were


def test_mlserver_gets_a_modelinfer_column_and_the_service_a_ratio_against_it():
    cells = [Cell(name, "ModelInfer", c, 100, 1.0, rps, 1.0, 2.0)
             for name, rps in (("service", 1200.0), ("raw", 4000.0), ("unbatched", 800.0), ("mlserver", 600.0))
             for c in (1, 32)]
    cells += [Cell(name, "Score", 32, 100, 1.0, 500.0, 1.0, 2.0) for name in ("service", "raw", "unbatched")]
    result = {"cells": [asdict(c) for c in cells], "goals": goals(cells)}
    assert result["goals"]["modelinfer_c32_service_over_mlserver"] == 2.0
    assert result["goals"]["modelinfer_c32_service_over_raw_batch32"] == 0.3
    lines = table(result).splitlines()
    headers = [lines[i + 1] for i, line in enumerate(lines) if line.startswith(("ModelInfer", "Score"))]
    assert "mlserver" in headers[0] and "mlserver" not in headers[1]


# -- --model hf-encoder-decoder: service vs raw ORT vs HF generate() ------------------------------
def test_hf_bench_puts_service_raw_ort_and_hf_generate_side_by_side(hf_family_runs):
    """The session's tiny encoder-decoder (tests/fixtures_hf.py), already published: a real server,
    the family's stepper over ORT, and model.generate(), each measured briefly at 1 and 4 clients."""
    from services.inference.bench import HF_GENERATE, BenchConfig, bench

    run = hf_family_runs["encoder_decoder"]
    result = bench(BenchConfig(model="hf-encoder-decoder", repo=run.repo.root, model_dir=run.policy_dir,
                               concurrency=(1, 4), seconds=0.3, rounds=1, warmup_s=0.05, max_new_tokens=4))
    cells = [Cell(**c) for c in result["cells"]]
    assert {(x.contender, x.concurrency) for x in cells} == {(n, c) for n in ("service", "raw", HF_GENERATE)
                                                              for c in (1, 4)}
    for x in cells:
        assert x.rpc == "Generate" and x.requests > 0 and x.failures == 0, x
        assert 1 <= x.tokens_per_s / x.throughput <= 4, x  # EOS included, at most max_new_tokens
    rss = result["peak_rss_bytes"]
    assert rss["server"] > 50 * 2**20 and rss["engine"] > 50 * 2**20  # both processes hold a runtime
    text = table(result)
    header = next(line for line in text.splitlines() if line.strip().startswith("concurrency"))
    assert header.split()[1:] == ["service", "raw", HF_GENERATE]
    assert [line.split()[0] for line in text.splitlines() if line.strip()[:2] in ("1 ", "4 ")] == ["1", "4"]
    assert "peak RSS: server process" in text and "engine process" in text
    metered = {(u["contender"], u["concurrency"]) for u in result["cores_used"]}
    assert metered == {(x.contender, x.concurrency) for x in cells}
    assert all(u["cores"] > 0 for u in result["cores_used"]) and "tokens per CPU-second at 4 clients" in text
    assert "goal: service >= 3x hf-generate at 4 clients" in text and "goal: service >= 0.8x raw at 4 clients" in text
    assert set(result["goals"]) == {f"generate_c{c}_service_over_{n}" for c in (1, 4) for n in ("hf_generate", "raw")}


def test_hf_generate_and_raw_ort_do_the_same_work_on_a_batch(hf_family_runs):
    """Greedy on the same weights, prompts of one length: model.generate() and the family's stepper
    over ORT give a batch the same answers, so the same number of tokens."""
    from fuseloop.repository import ModelRepository
    from services.inference.bench import RawRunner, Workload
    from services.inference.bench_hf import HFGenerate

    run = hf_family_runs["encoder_decoder"]
    raw = RawRunner(ModelRepository(run.repo.root), threads=1)
    hf = HFGenerate("hf-encoder-decoder", run.policy_dir, threads=1)
    w = Workload.scenes_of_one_length(raw.pre.prompt_ids, n=8)
    assert len({len(raw.pre.prompt_ids(p)) for p in w.prompts}) == 1
    idx = list(range(8))
    assert hf.generate(w, idx, 12) == raw.generate(w, idx, 12, temperature=0.0)


def test_hf_bench_refuses_a_repo_without_the_model_directory(tmp_path, capsys):
    from fuseloop.cli import main

    assert main(["bench", "inference", "--model", "hf-encoder-decoder", "--repo", str(tmp_path)]) == 2
    assert "--repo needs --model-dir" in capsys.readouterr().err
