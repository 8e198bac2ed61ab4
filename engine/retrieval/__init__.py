"""The path of a request: the micro-batcher (batcher.py) groups concurrent queries, the retriever (retriever.py)
turns them into one filtered top-k call on a backend (topk.py: the protocol, the NumPy reference, get_backend;
kernels in engine/cpu and engine/gpu)."""
