"""`fuseloop serve inference` / `fuseloop bench inference` parse as documented; runtimes come from a spec."""

from __future__ import annotations

import argparse

import pytest

from services.inference import cli
from services.inference.runtime import make_runtime
from services.inference.runtime.onnx_runtime import OnnxRuntime


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fuseloop")
    sub = parser.add_subparsers(dest="command", required=True)
    cli.add_serve_parser(sub.add_parser("serve").add_subparsers(dest="service", required=True))
    cli.add_bench_parser(sub.add_parser("bench").add_subparsers(dest="bench", required=True))
    return parser.parse_args(argv)


def test_serve_inference_takes_the_documented_options():
    args = parse(["serve", "inference", "--repo", "/r", "--port", "50051", "--runtime", "triton://h:8001",
                  "--bus", "sqlite:///tmp/b.db", "--admin-token", "t", "--metrics-port", "9100"])
    assert (args.repo, args.port, args.runtime, args.bus, args.admin_token, args.metrics_port) == \
           ("/r", 50051, "triton://h:8001", "sqlite:///tmp/b.db", "t", 9100)
    assert args.func is cli.serve_inference


def test_bench_inference_takes_json_and_an_optional_repository():
    args = parse(["bench", "inference", "--json"])
    assert args.json and args.repo is None and args.func is cli.bench_inference


def test_runtimes_come_from_a_spec():
    assert isinstance(make_runtime("onnxruntime"), OnnxRuntime)
    with pytest.raises(ValueError, match="unknown runtime 'tensorflow'"):
        make_runtime("tensorflow")


def test_serving_refuses_a_bad_runtime_or_a_missing_repository_with_a_message(tmp_path, capsys):
    assert cli.serve_inference(parse(["serve", "inference", "--repo", str(tmp_path), "--runtime", "nope"])) == 2
    assert "unknown runtime 'nope'" in capsys.readouterr().err
    assert cli.serve_inference(parse(["serve", "inference", "--repo", str(tmp_path / "missing")])) == 2
    assert "does not exist" in capsys.readouterr().err
