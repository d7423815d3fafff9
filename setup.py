"""Builds the C parts in native/: dadi._native (the index searches) and dadi._fastfs (the node daemon's
native read path for read-only views; needs libfuse3, liblz4 and libxxhash).

The pure-Python twins of dadi._native live in dadi/format; DADI_NATIVE=0 selects them at import time.
Without dadi._fastfs the daemon serves every view from Python (dadi.node.nativeviews says why in its log).
"""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "dadi._native",
            sources=["native/dadi_native.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror", "-std=c11"],
        ),
        Extension(
            "dadi._fastfs",
            sources=["native/dadi_fastfs.c"],
            include_dirs=["/usr/include/fuse3"],
            libraries=["fuse3", "lz4", "xxhash", "pthread"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror", "-std=gnu11"],
        ),
    ]
)
