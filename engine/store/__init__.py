"""LMDB and nothing else: the write-ahead log, idempotency and user indexes, checkpointed items and users, in two
environments (store.py states the layout and the contracts)."""
