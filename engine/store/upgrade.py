"""Stores of format 1 and 2 kept every database in one environment; format 3 moved the checkpointed state
into an environment of its own. Upgraded on open."""
from __future__ import annotations

import logging
from pathlib import Path

import lmdb

from streamrec.engine.store.layout import _LOG_META, _META_FORMAT, _STATE_DBS, _STORE_FORMAT, _put_all
from streamrec.engine.store.lmdb_env import LmdbEnv

logger = logging.getLogger(__name__)


def upgrade_single_environment(log: LmdbEnv, state: LmdbEnv, state_path: Path) -> None:
    """Format 1/2 -> 3: copy the state's databases into the state environment, then drop them from the log's.
    A crash in between leaves the log environment at its old format, and the copy is simply redone."""
    log_env = log.env
    moved = [name for name in _STATE_DBS if name != "meta"]
    with log.read() as txn:
        contents = {}
        for name in moved:
            db = log_env.open_db(name.encode(), txn=txn, create=False, **_STATE_DBS[name]) \
                if txn.get(name.encode()) is not None else None
            contents[name] = list(txn.cursor(db=db).iternext()) if db is not None else []
        meta = log_env.open_db(b"meta", txn=txn, create=False)
        state_meta = [(k, v) for k, v in txn.cursor(db=meta).iternext() if k.decode() not in _LOG_META]
    state_env = state.env

    def copy(txn: lmdb.Transaction) -> None:
        for name, pairs in contents.items():
            db = state_env.open_db(name.encode(), txn=txn, **_STATE_DBS[name])
            txn.drop(db, delete=False)
            _put_all(txn.cursor(db=db), pairs)
        db = state_env.open_db(b"meta", txn=txn)
        _put_all(txn.cursor(db=db), state_meta)
        txn.put(_META_FORMAT.encode(), _STORE_FORMAT, db=db)

    state.write(copy)

    def drop(txn: lmdb.Transaction) -> None:
        for name in moved:
            if txn.get(name.encode()) is not None:
                txn.drop(log_env.open_db(name.encode(), txn=txn, create=False, **_STATE_DBS[name]), delete=True)
        db = log_env.open_db(b"meta", txn=txn)
        for key, _ in state_meta:
            txn.delete(key, db=db)
        txn.put(_META_FORMAT.encode(), _STORE_FORMAT, db=db)

    log.write(drop)
    logger.info("store upgraded to format %d: checkpointed state moved to %s", _STORE_FORMAT[0],
                state_path)

# --- lifecycle ---
