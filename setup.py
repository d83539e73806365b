"""Builds the native core ``engine._native`` (pybind11, C++17, not linked against torch).

liburing is found with pkg-config; without it the extension is built with the
thread-pool I/O backend only. OpenMP is used when the compiler supports it.
Set ``MEMASCEND_NO_URING=1`` to build without io_uring even when liburing exists.
"""
import glob
import os
import shutil
import subprocess
import sys

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext, has_flag
from setuptools import setup


def _pkg_config(package: str):
    """Returns (cflags, libs) for ``package``, or None when pkg-config cannot find it."""
    if shutil.which("pkg-config") is None:
        return None
    try:
        cflags = subprocess.check_output(["pkg-config", "--cflags", package], text=True).split()
        libs = subprocess.check_output(["pkg-config", "--libs", package], text=True).split()
    except subprocess.CalledProcessError:
        return None
    return cflags, libs


class BuildExt(build_ext):
    """Adds OpenMP when the compiler accepts it, and reports what was built."""

    def build_extensions(self):
        for ext in self.extensions:
            if has_flag(self.compiler, "-fopenmp"):
                ext.extra_compile_args.append("-fopenmp")
                ext.extra_link_args.append("-fopenmp")
                ext.define_macros.append(("MEMASCEND_HAVE_OPENMP", "1"))
            else:
                print("memascend: compiler has no OpenMP; kernels run single-threaded", file=sys.stderr)
        super().build_extensions()


# Compile the sources in parallel (MEMASCEND_BUILD_JOBS, default: all cores).
ParallelCompile("MEMASCEND_BUILD_JOBS").install()

sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
define_macros = []
extra_compile_args = ["-O3", "-fvisibility=hidden", "-Wall", "-Wextra", "-Wno-unused-parameter"]
extra_link_args = []
libraries = []

uring = None if os.environ.get("MEMASCEND_NO_URING") else _pkg_config("liburing")
if uring is not None:
    cflags, libs = uring
    extra_compile_args += cflags
    extra_link_args += libs
    define_macros.append(("MEMASCEND_HAVE_URING", "1"))
    print("memascend: building with io_uring (liburing found by pkg-config)", file=sys.stderr)
else:
    print("memascend: liburing not found; building the thread-pool I/O backend only", file=sys.stderr)

ext = Pybind11Extension(
    "engine._native",
    sources,
    include_dirs=["csrc"],
    cxx_std=17,
    define_macros=define_macros,
    extra_compile_args=extra_compile_args,
    extra_link_args=extra_link_args + ["-pthread"],
    libraries=libraries,
)

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExt})
