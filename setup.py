"""Builds the optional C hot paths in native/ as dadi._native.

The pure-Python twins live in dadi/format; DADI_NATIVE=0 selects them at import time.
"""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "dadi._native",
            sources=["native/dadi_native.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror", "-std=c11"],
        )
    ]
)
