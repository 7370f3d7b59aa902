"""Build tkd: the Python package `tkd_core`, the Triton kernels mapped in as `tkd_core.kernels`,
and the compiled INT8 GEMM extension `tkd_core._C` (pybind11; CUDA part only where nvcc exists).

`kernels/` is installed as `tkd_core.kernels`, never as a top-level `kernels` package: a different
PyPI project owns that name.
"""
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "csrc"))

try:  # csrc/build_ext.py owns the extension build (CPU always, CUDA when nvcc is found)
    from build_ext import extension_kwargs
except ImportError:  # the extension sources are not there yet: pure-Python install
    def extension_kwargs():
        return {}

setup(
    name="tkd",
    version="0.1.0",
    description="Fused Triton kernels, an INT8 GEMM extension and a distillation trainer for "
                "Transformer knowledge distillation (TKD-NLP) on GLUE",
    python_requires=">=3.9",
    # bench/ runs from the source tree (`python -m bench`); it is not installed.
    packages=["tkd_core", "tkd_core.int8", "tkd_core.models", "tkd_core.study",
              "tkd_core.kernels"],
    package_dir={"tkd_core": "tkd_core", "tkd_core.kernels": "kernels"},
    # the default job (`python -m tkd_core.train`) needs these; the study and GLUE through the
    # hub need the extras; `transformers` is a test and bench dependency only
    install_requires=["torch>=2.4", "triton>=3.2", "numpy>=1.24", "tokenizers>=0.15",
                      "safetensors>=0.4", "tqdm>=4.66"],
    extras_require={
        "study": ["matplotlib>=3.7", "scikit-learn>=1.3"],
        "glue-hub": ["datasets>=2.18"],
        "test": ["pytest>=7", "hypothesis>=6", "transformers>=4.40", "ruff>=0.5"],
    },
    zip_safe=False,
    **extension_kwargs(),
)
