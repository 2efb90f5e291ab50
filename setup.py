"""The one compiled module, optional: without a C compiler slabcast installs and runs on ctypes (core/ring.py)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "slabcast.core._hot",
            ["src/slabcast/core/_hot.c"],
            extra_compile_args=["-O2", "-std=c11", "-D_GNU_SOURCE", "-ffp-contract=off"],
            optional=True,
        )
    ]
)
