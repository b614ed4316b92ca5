"""Build and install solar_kernels (and the `solar` command).

The package is pure Python + Triton today; the CUDA C++ extension (csrc/) is added to
``ext_modules`` when it lands. ``pip install --no-deps --no-build-isolation -e .`` works against
whatever torch a GPU machine already has.
"""

from setuptools import find_packages, setup

setup(
    name="solar_kernels",
    version="0.1.0",
    description="Fused kernels, a lean Llama/Mistral model and the SOLAR depth up-scaling recipe",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["solar_kernels", "solar_kernels.*"]),
    install_requires=[
        "torch>=2.6",
        "triton>=3.2; platform_system == 'Linux'",
        "safetensors>=0.4",
        "pyyaml>=6",
        "tqdm>=4",
    ],
    entry_points={"console_scripts": ["solar=solar_kernels.cli:main"]},
    extras_require={
        # What the test suite needs beyond the package: transformers is the parity oracle.
        # The trainer (training/): data through Hugging Face datasets, tokenizers, loss plots.
        "train": [
            "datasets>=3",
            "transformers>=4.45",
            "matplotlib>=3.7",
        ],
        "test": [
            "datasets>=3",
            "pytest>=8",
            "pytest-timeout>=2",
            "pytest-benchmark>=4",
            "numpy>=1.26",
            "transformers>=4.45",
            "matplotlib>=3.7",
        ],
    },
)
