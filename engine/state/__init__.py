"""The in-memory model and the rules that change it: State (catalog of items, table of users), the online rule
(online.py, NumPy reference of cpu/online.py) and what a checkpoint copies (snapshot.py). Changed only by the
writer thread, under the engine lock; read by retrieval under the same lock."""
