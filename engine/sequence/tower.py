"""The sequence user tower at serving time: an ONNX model, trained offline (`streamrec train-sequence`,
engine/offline/sequence.py), that turns a user's last L events into their query vector in the retrieval's item
space. Only onnxruntime and numpy here.

The model's inputs, all int64 [1, L], right-aligned (the latest event at L - 1) and left-padded with 0:
  items  1 + the item's index in the model's own item table: the unit item vectors it was trained against,
         frozen inside the model. An item the model does not know (added after training) gets 0, the padding
         token, so it counts only through its type and time gap until the model is retrained.
  types  type_token() of the event (a rating: its rounded value), gaps gap_bucket() of the time since the event
         before it, mask 1 where there is an event.
Output `query` float32 [1, d], a unit vector scored by cosine against the live item vectors.

Invariant: a query is a pure function of (model, the user's recent history). It is computed one user per run
at a fixed input shape, so the same history gives the same bits whenever it is computed: live, replayed after
a restart, or on a replica, however the events were batched.

The sidecar `<model>.json` names the format, the window length, the dimension, the table's item ids in order
and a probe: a sample of the table's unit vectors, compared at load with the engine's vectors of the same
items, so a model trained against another item space (another seeding) is refused instead of served.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

FORMAT = "streamrec-sequence-tower"
INPUTS = ("items", "types", "gaps", "mask")
N_TYPES = 16  # 0 pad, 1..7 event types, 8..13 a RATING's rounded value 0..5
N_GAPS = 34  # 0 pad, 1 no event before it, 2..33 log2 buckets of the gap in seconds
MIN_PROBE_COSINE = 0.9  # mean cosine of the probe items to the engine's: below it the item spaces differ
MAX_MODEL_BYTES = 256 << 20
SHIPPED_SEQUENCE_MODEL = Path(__file__).parent / "models" / "ml100k-sequence.onnx"
_RATING = 5  # EventType.RATING


class SequenceModelRejected(ValueError):
    """The file is not a usable sequence tower for this engine; the message says why."""


def type_token(event_type: int, value: float) -> int:
    if int(event_type) == _RATING:
        return 8 + int(min(max(round(float(value)), 0), 5))
    return int(event_type)


def gap_bucket(gap_ms: int | None) -> int:
    if gap_ms is None:
        return 1
    seconds = max(int(gap_ms), 0) / 1000.0
    return 2 + min(int(math.log2(1.0 + seconds)), N_GAPS - 3)


def sidecar_path(model_path: str | Path) -> Path:
    return Path(model_path).with_suffix(".json")


def open_session(source: str | bytes, threads: int = 1):
    """One intra-op thread and sequential execution: the model is small, and one thread keeps the bits fixed."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


class SequenceTower:
    """A loaded tower. `query(history, item_id_of)` gives one user's unit query vector."""

    def __init__(self, path: str | Path, dim: int):
        path = Path(path)
        try:
            if path.stat().st_size > MAX_MODEL_BYTES:
                raise SequenceModelRejected(f"{path} is larger than {MAX_MODEL_BYTES} bytes")
            data = path.read_bytes()
            meta = json.loads(sidecar_path(path).read_text())
        except OSError as error:
            raise SequenceModelRejected(f"cannot read {error.filename}: {error.strerror}") from None
        except ValueError as error:
            raise SequenceModelRejected(f"{sidecar_path(path)} is not valid JSON: {error}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise SequenceModelRejected(f"{sidecar_path(path)} does not describe a {FORMAT} model")
        if meta.get("dim") != dim:
            raise SequenceModelRejected(f"the model was trained at dimension {meta.get('dim')}; the engine's is {dim}")
        self.path, self.dim, self.metadata = str(path), dim, meta
        self.length = int(meta["length"])
        self.version = meta.get("version") or f"sha256:{hashlib.sha256(data).hexdigest()[:12]}"
        self.index = {item_id: i + 1 for i, item_id in enumerate(meta["item_ids"])}
        try:
            self.session = open_session(data)
        except Exception as error:  # noqa: BLE001 - onnxruntime raises several types for a bad file
            raise SequenceModelRejected(f"{path} is not a loadable ONNX model: {str(error).splitlines()[0]}") from None
        names = [i.name for i in self.session.get_inputs()]
        shapes = [list(i.shape) for i in self.session.get_inputs()]
        if names != list(INPUTS) or any(shape != [1, self.length] for shape in shapes):
            raise SequenceModelRejected(f"the model takes {dict(zip(names, shapes))}; expected {list(INPUTS)} "
                                        f"each [1, {self.length}]")
        out = self.session.run(["query"], self._feeds([]))[0]
        if out.shape != (1, dim) or not np.all(np.isfinite(out)):
            raise SequenceModelRejected(f"the model's output for an empty window is {out.shape}, not [1, {dim}] finite")

    def check_item_space(self, vector_of: Callable[[str], np.ndarray | None]) -> float:
        """Mean cosine between the sidecar's probe vectors and the engine's vectors of the same items
        (`vector_of(item_id)`, None when the engine lacks it); SequenceModelRejected below MIN_PROBE_COSINE."""
        probe = self.metadata.get("probe") or {}
        cosines = []
        for item_id, expected in zip(probe.get("item_ids", []), probe.get("vectors", [])):
            vector = vector_of(item_id)
            if vector is None:
                continue
            expected, vector = np.asarray(expected, np.float64), np.asarray(vector, np.float64)
            norm = np.linalg.norm(expected) * np.linalg.norm(vector)
            cosines.append(float(expected @ vector / norm) if norm > 0 else 0.0)
        if not cosines:
            raise SequenceModelRejected("none of the model's probe items is in this engine's catalog")
        mean = float(np.mean(cosines))
        if mean < MIN_PROBE_COSINE:
            raise SequenceModelRejected(
                f"the model was trained against another item space (probe items' mean cosine {mean:.3f} < "
                f"{MIN_PROBE_COSINE}); train one against this store: streamrec train-sequence --store DATA_DIR")
        return mean

    def _feeds(self, window: Sequence[tuple[int, int, int]]) -> dict[str, np.ndarray]:
        feeds = {name: np.zeros((1, self.length), np.int64) for name in INPUTS}
        n = len(window)
        if n:
            feeds["items"][0, self.length - n:] = [w[0] for w in window]
            feeds["types"][0, self.length - n:] = [w[1] for w in window]
            feeds["gaps"][0, self.length - n:] = [w[2] for w in window]
            feeds["mask"][0, self.length - n:] = 1
        return feeds

    def window(self, history: Sequence[tuple], item_id_of: Callable[[int], str | None]) -> list[tuple[int, int, int]]:
        """(model item, type token, gap bucket) of the last L entries of `history`, a user's events oldest first
        as (item row, type, value, timestamp_ms). The oldest entry the history keeps has no known predecessor
        (gap bucket 1), so keep more history than L to give every window position its real gap."""
        entries = list(history)
        skip = max(len(entries) - self.length - 1, 0)  # the entry before the window still gives the first gap
        out, previous_ms = [], None
        index = self.index
        for row, event_type, value, timestamp_ms in entries[skip:]:
            out.append((index.get(item_id_of(row), 0), type_token(event_type, value),
                        gap_bucket(None if previous_ms is None else timestamp_ms - previous_ms)))
            previous_ms = timestamp_ms
        return out[-self.length:]

    def query(self, history: Sequence[tuple], item_id_of: Callable[[int], str | None]) -> np.ndarray:
        return self.query_window(self.window(history, item_id_of))

    def query_window(self, window: Sequence[tuple[int, int, int]]) -> np.ndarray:
        """The query of a window() (onnxruntime releases the GIL: no lock needs to be held)."""
        return self.session.run(["query"], self._feeds(window))[0][0]

    def info(self) -> dict:
        return {"version": self.version, "path": self.path, "length": self.length, "items": len(self.index),
                "dataset": self.metadata.get("dataset", "")}
