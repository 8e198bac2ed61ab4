"""A small hand-built sequence tower for the serving tests (no torch): the same inputs and output as a trained
one (engine/sequence/tower.py), query = unit(sum over the window of (item vector + type vector) * position
weight), so order, types and items all move it. Its item table is the given catalog's unit vectors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from streamrec.engine.offline.sequence import write_sidecar
from streamrec.engine.sequence.tower import INPUTS, N_TYPES


def make_tower(path: Path, item_ids: list[str], vectors: np.ndarray, length: int = 8, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    dim = vectors.shape[1]
    units = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    table = np.vstack([np.zeros((1, dim)), units]).astype(np.float32)
    init = [numpy_helper.from_array(table, "table"),
            numpy_helper.from_array((0.3 * rng.standard_normal((N_TYPES, dim))).astype(np.float32), "type_table"),
            numpy_helper.from_array(np.linspace(0.2, 1.0, length, dtype=np.float32).reshape(1, length, 1), "position"),
            numpy_helper.from_array(np.array([2], np.int64), "axis2"),
            numpy_helper.from_array(np.array([1], np.int64), "axis1"),
            numpy_helper.from_array(np.full((1, dim), 1e-3, np.float32), "bias")]
    nodes = [
        helper.make_node("Gather", ["table", "items"], ["e"]),
        helper.make_node("Gather", ["type_table", "types"], ["t"]),
        helper.make_node("Add", ["e", "t"], ["et"]),
        helper.make_node("Cast", ["mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "axis2"], ["m3"]),
        helper.make_node("Mul", ["et", "m3"], ["masked"]),
        helper.make_node("Mul", ["masked", "position"], ["weighted"]),
        helper.make_node("ReduceSum", ["weighted", "axis1"], ["summed"], keepdims=0),
        helper.make_node("Add", ["summed", "bias"], ["raw"]),
        helper.make_node("LpNormalization", ["raw"], ["query"], axis=1, p=2),
    ]
    inputs = [helper.make_tensor_value_info(name, TensorProto.INT64, [1, length]) for name in INPUTS]
    graph = helper.make_graph(nodes, "tower", inputs, [helper.make_tensor_value_info("query", TensorProto.FLOAT, [1, dim])],
                              init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    write_sidecar(str(path), list(item_ids), vectors, length, "test")
    return path
