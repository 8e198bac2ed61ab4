"""The second stage: an ONNX model (reranker.py, served by onnxruntime) reorders retrieved candidates by features
built for the whole batch (features.py; kernel in engine/cpu/features.py). models/ holds the shipped model."""
