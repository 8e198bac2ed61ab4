"""ReplicationService: a replica on another machine copies the primary's state and follows its log
(proto/streamrec/v1/replication.proto). The servicer is the primary's side; `GrpcLogSource` is the replica's,
the LogSource its engine reads (engine/replica/remote.py)."""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import grpc

from streamrec.engine import OtherLog, SnapshotData
from streamrec.server.errors import streaming
from streamrec.server.servicers import EngineHolder
from streamrec.v1 import replication_pb2, replication_pb2_grpc

_SNAPSHOT_RECORDS_PER_CHUNK = 1024  # item or user records per message: well under the message size limit
_FILE_CHUNK_BYTES = 1 << 20
_IDLE_S = 1.0  # an idle TailLog sends an empty batch this often: the replica learns the primary's last seq


class ReplicationServicer(replication_pb2_grpc.ReplicationServiceServicer):
    def __init__(self, holder: EngineHolder):
        self.holder = holder

    @streaming
    def Snapshot(self, request, context):
        snap = self.holder.get().feed.snapshot(request.at_least_seq)
        yield replication_pb2.SnapshotChunk(log_id=snap.log_id, watermark=snap.watermark, meta=snap.meta)
        for start in range(0, max(len(snap.items), len(snap.users)), _SNAPSHOT_RECORDS_PER_CHUNK):
            end = start + _SNAPSHOT_RECORDS_PER_CHUNK
            yield replication_pb2.SnapshotChunk(items=snap.items[start:end], users=snap.users[start:end])

    @streaming
    def TailLog(self, request, context):
        feed = self.holder.get().feed
        after = request.from_seq
        while context.is_active():
            records = feed.records_after(after, request.log_id)
            if records:
                after = records[-1][0]
            elif feed.wait_after(after, _IDLE_S):
                continue
            yield replication_pb2.LogBatch(records=[replication_pb2.LogRecord(seq=s, payload=p) for s, p in records],
                                           last_seq=feed.last_seq())

    @streaming
    def FetchModel(self, request, context):
        for name, path in self.holder.get().feed.model_files(request.path):
            with open(path, "rb") as file:
                while chunk := file.read(_FILE_CHUNK_BYTES):
                    yield replication_pb2.FileChunk(name=name, data=chunk)


class GrpcLogSource:
    """The replica's side: Snapshot, TailLog and FetchModel on the primary, over one channel."""

    def __init__(self, channel: grpc.Channel, metadata: list[tuple[str, str]] = ()):
        self._channel = channel
        self._stub = replication_pb2_grpc.ReplicationServiceStub(channel)
        self._metadata = list(metadata)
        self._call = None

    def snapshot(self, at_least_seq: int) -> SnapshotData:
        chunks = self._stub.Snapshot(replication_pb2.SnapshotRequest(at_least_seq=at_least_seq), metadata=self._metadata)
        first = next(chunks)
        snap = SnapshotData(first.log_id, first.watermark, dict(first.meta), [], [])
        for chunk in chunks:
            snap.items += chunk.items
            snap.users += chunk.users
        return snap

    def tail(self, from_seq: int, log_id: str) -> Iterator[tuple[list[tuple[int, bytes]], int]]:
        self._call = self._stub.TailLog(replication_pb2.TailLogRequest(log_id=log_id, from_seq=from_seq),
                                        metadata=self._metadata)
        try:
            for batch in self._call:
                yield [(r.seq, r.payload) for r in batch.records], batch.last_seq
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.FAILED_PRECONDITION and "log_id" in (error.details() or ""):
                raise OtherLog("log_id", error.details()) from None
            raise

    def fetch_model(self, path: str, into: Path) -> Path:
        """The model (and its sidecar) under `into`, named after the primary's path so two models never clash."""
        into.mkdir(parents=True, exist_ok=True)
        stem = f"{hashlib.sha256(path.encode()).hexdigest()[:12]}-{Path(path).stem}"
        target = into / f"{stem}.onnx"
        files = {"model": target, "sidecar": target.with_suffix(".json")}
        partial = {name: file.with_name(file.name + ".partial") for name, file in files.items()}
        written = set()
        with_handles = {}
        try:
            for chunk in self._stub.FetchModel(replication_pb2.FetchModelRequest(path=path), metadata=self._metadata):
                if chunk.name not in with_handles:
                    with_handles[chunk.name] = open(partial[chunk.name], "wb")
                with_handles[chunk.name].write(chunk.data)
                written.add(chunk.name)
        finally:
            for handle in with_handles.values():
                handle.close()
        for name in written:  # whole files only: a model is never loaded half-copied
            os.replace(partial[name], files[name])
        return target

    def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
        self._channel.close()
