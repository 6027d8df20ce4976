"""bitnet-py: BitNet b1.58 inference in Python + Numba, bitnet.cpp-compatible GGUF, OpenAI-compatible server."""
__version__ = "0.1.0"
