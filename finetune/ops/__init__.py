"""The WKV operators of each RWKV generation (PyTorch references, compiled kernels and the dispatch between them).

The lowest layer of the package: it imports torch and nothing above it.
"""
