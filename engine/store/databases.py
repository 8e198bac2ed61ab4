"""Opening the store's databases (layout.py lists them): by the writer, which creates them, stamps the format and
upgrades an older store; or read-only by a replica, which needs them to exist in the current format."""
from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import lmdb

from streamrec.engine.store.layout import (
    _LOG_DBS,
    _META_FORMAT,
    _META_LOG_ID,
    _STATE_DBS,
    _STATE_DIR,
    _STORE_FORMAT,
    _UPGRADABLE_FORMATS,
)
from streamrec.engine.store.lmdb_env import LmdbEnv
from streamrec.engine.store.upgrade import upgrade_single_environment

Databases = dict[str, object]  # name -> LMDB database handle


def open_for_writing(log_env: LmdbEnv, state_env: LmdbEnv, path: Path) -> tuple[Databases, Databases]:
    """(log databases, state databases), created when missing; a store of an older format is upgraded first."""
    fmt = log_env.write(lambda txn: txn.get(_META_FORMAT.encode(), db=log_env.env.open_db(b"meta", txn=txn)))
    if fmt in _UPGRADABLE_FORMATS:
        upgrade_single_environment(log_env, state_env, path / _STATE_DIR)
    elif fmt is not None and fmt != _STORE_FORMAT:
        raise ValueError(f"store format {fmt!r} is not supported (expected {_STORE_FORMAT!r})")

    def open_all(env: lmdb.Environment, specs: dict[str, dict[str, bool]]) -> Callable:
        def fn(txn: lmdb.Transaction) -> Databases:
            dbs = {name: env.open_db(name.encode(), txn=txn, **flags) for name, flags in specs.items()}
            txn.put(_META_FORMAT.encode(), _STORE_FORMAT, db=dbs["meta"])
            if specs is _LOG_DBS:  # a new log gets its id; an existing one keeps it
                txn.put(_META_LOG_ID.encode(), uuid.uuid4().hex.encode(), db=dbs["meta"], overwrite=False)
            return dbs
        return fn

    # The state's format first: a log environment marked format 3 always has its state environment.
    state_dbs = state_env.write(open_all(state_env.env, _STATE_DBS))
    log_dbs = log_env.write(open_all(log_env.env, _LOG_DBS))
    return log_dbs, state_dbs


def open_read_only(log_env: LmdbEnv, state_env: LmdbEnv) -> tuple[Databases, Databases]:
    """(log databases, state databases) of a store the writer has initialised (a replica never upgrades one)."""
    def open_all(env: LmdbEnv, specs: dict[str, dict[str, bool]]) -> Databases:
        try:
            dbs = {name: env.env.open_db(name.encode(), create=False, **flags) for name, flags in specs.items()}
        except lmdb.NotFoundError:
            raise ValueError(f"{env.env.path()} is not an initialised streamrec store") from None
        with env.read() as txn:
            fmt = txn.get(_META_FORMAT.encode(), db=dbs["meta"])
        if fmt != _STORE_FORMAT:
            raise ValueError(f"store format {fmt!r} is not supported read-only (expected {_STORE_FORMAT!r})")
        return dbs

    return open_all(log_env, _LOG_DBS), open_all(state_env, _STATE_DBS)
