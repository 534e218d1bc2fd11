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
