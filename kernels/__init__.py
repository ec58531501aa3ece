"""Triton kernels of ued_fast, installed as ued_fast.kernels (see setup.py's package_dir).

Each module launches its kernels on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set
before triton was imported (that is how the tests run them on a machine without a GPU).
"""
