"""ONNX export of one family graph (`Graph`), the one exporter every family's graphs go through."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from fuseloop.families.base import Graph

OPSET = 20


def export_onnx(graph: Graph, path: Path, external_data: bool = False) -> Path:
    """torch.onnx.export (dynamo) of `graph.module(**graph.inputs)`; the input names are the
    inputs' keys. Example inputs must not use size 1 (or 0) on a dynamic axis: torch.export
    specializes it. `external_data=True` writes the weights beside the graph (`<name>.onnx.data`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # The exporter logs one line per torchvision op it can't register; no family uses them.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    graph.module.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # optimize=False keeps every weight an initializer named after its parameter, which is what
        # lets later versions reuse the graph (trainer.export.swap_weights); ORT optimizes at load.
        program = torch.onnx.export(graph.module, args=(), kwargs=graph.inputs, f=None, input_names=list(graph.inputs),
                                    output_names=graph.outputs, dynamic_shapes=graph.dynamic_shapes, dynamo=True,
                                    opset_version=OPSET, verbose=False, optimize=False)
    program.save(str(path), external_data=external_data)
    return path
