"""Build and install solar_kernels (and the `solar` command).

The CUDA C++ kernels in csrc/ are built as the extension ``solar_kernels._C`` when the torch found at
build time is a CUDA build and nvcc is found; otherwise the package installs as pure Python + Triton
and a note on stderr says why (``pip install -v`` shows it). ``pip install --no-deps
--no-build-isolation -e .`` builds against whatever torch the machine already has.

Environment:
    SOLAR_KERNELS_SKIP_CUDA=1           do not build the extension
    SOLAR_KERNELS_CUDA_ARCHS="8.0;9.0a" GPU architectures, ";"-separated; "9.0a" is Hopper's
                                        arch-specific target, "+PTX" (e.g. "9.0+PTX") also embeds PTX
                                        that newer GPUs can compile
    CUDA_HOME                           the CUDA toolkit (default: the one whose nvcc is on PATH)
    MAX_JOBS                            parallel compile jobs (default: from the cores and memory)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0a"
# nvcc and the C++ compiler each peak at about 2-3 GB on a torch host file; this keeps a small CI
# machine out of swap.
GB_PER_COMPILE_JOB = 3


def _note(message: str) -> None:
    print(f"solar_kernels setup: {message}", file=sys.stderr)


def _find_cuda_home():
    """The CUDA toolkit folder (the one holding bin/nvcc), or None when there is no nvcc."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        if not os.path.exists(os.path.join(home, "bin", "nvcc")):
            raise SystemExit(f"solar_kernels setup: CUDA_HOME={home} has no bin/nvcc; fix or unset CUDA_HOME")
        return home
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    if nvcc is None:
        return None
    home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h")):
        return home
    # nvcc on PATH may be a wrapper script: nvcc itself reports its real bin folder as _HERE_.
    dry_run = subprocess.run(
        [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull], capture_output=True, text=True
    )
    found = re.search(r"^#\$ _HERE_=(.+)$", dry_run.stdout + dry_run.stderr, re.MULTILINE)
    return os.path.dirname(found.group(1).strip()) if found else home


def _gencode_flags(archs: str):
    """("-gencode=..." flags, "sm_80+sm_90a" tag) from "8.0;9.0a" (optionally "+PTX" per entry)."""
    flags, tags = [], []
    for entry in filter(None, (a.strip() for a in archs.replace(",", ";").split(";"))):
        match = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", entry)
        if match is None:
            raise SystemExit(
                f"solar_kernels setup: SOLAR_KERNELS_CUDA_ARCHS entry {entry!r} is not like 8.0, 9.0a or 9.0+PTX"
            )
        number = match.group(1) + match.group(2) + match.group(3)
        flags.append(f"-gencode=arch=compute_{number},code=sm_{number}")
        tags.append(f"sm_{number}")
        if match.group(4):
            flags.append(f"-gencode=arch=compute_{number},code=compute_{number}")
            tags.append(f"compute_{number}")
    if not flags:
        raise SystemExit("solar_kernels setup: SOLAR_KERNELS_CUDA_ARCHS names no architecture")
    return flags, "+".join(tags)


def _default_max_jobs() -> int:
    cores = os.cpu_count() or 1
    try:
        memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return cores
    return max(1, min(cores, int(memory_gb // GB_PER_COMPILE_JOB)))


def _cuda_extension():
    """([CUDAExtension], cmdclass) when solar_kernels._C can be built here, else ([], {}) and a note."""
    if os.environ.get("SOLAR_KERNELS_SKIP_CUDA") == "1":
        _note("SOLAR_KERNELS_SKIP_CUDA=1: the CUDA extension solar_kernels._C is not built")
        return [], {}
    try:
        import torch
    except ImportError:
        _note(
            "torch is not importable at build time (install it first and use --no-build-isolation): "
            "the CUDA extension solar_kernels._C is not built"
        )
        return [], {}
    if torch.version.cuda is None:
        _note(f"torch {torch.__version__} is a CPU build: the CUDA extension solar_kernels._C is not built")
        return [], {}
    cuda_home = _find_cuda_home()
    if cuda_home is None:
        _note("nvcc not found (set CUDA_HOME or put nvcc on PATH): the CUDA extension solar_kernels._C is not built")
        return [], {}
    # torch.utils.cpp_extension reads CUDA_HOME when it is first imported (and guesses wrong when
    # nvcc is a wrapper script): set it before, and on the module in case it was imported already.
    os.environ["CUDA_HOME"] = cuda_home
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = cuda_home
    os.environ.setdefault("MAX_JOBS", str(_default_max_jobs()))
    gencode, arch_tag = _gencode_flags(os.environ.get("SOLAR_KERNELS_CUDA_ARCHS", DEFAULT_CUDA_ARCHS))
    _note(f"building solar_kernels._C for {arch_tag} with {cuda_home}/bin/nvcc, MAX_JOBS={os.environ['MAX_JOBS']}")
    # Kernels in .cu files with no torch header; torch only in the *_host.cpp files and the bindings.
    sources = sorted(
        f"csrc/{name}" for name in os.listdir(os.path.join(HERE, "csrc")) if name.endswith((".cu", ".cpp"))
    )
    extension = cpp_extension.CUDAExtension(
        name="solar_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={
            "cxx": ["-O3", f"-DSOLAR_KERNELS_CUDA_ARCHS={arch_tag}"],
            "nvcc": ["-O3", "-lineinfo", *gencode],
        },
    )
    return [extension], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _cuda_extension()

setup(
    name="solar_kernels",
    version="0.1.0",
    description="Fused kernels, a lean Llama/Mistral model and the SOLAR depth up-scaling recipe",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # training/ (the stages behind `solar pretrain|sft|dpo|demo`) ships beside the library.
    packages=find_packages(include=["solar_kernels", "solar_kernels.*", "training", "training.*"]),
    package_data={"training": ["configs/*.yaml"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.6",
        "triton>=3.2",  # the kernels, and so the model, upscale and convert, import it
        "safetensors>=0.4",
        "pyyaml>=6",
        "tqdm>=4",
    ],
    entry_points={
        "console_scripts": ["solar=solar_kernels.cli:main"],
        # `solar pretrain|sft|dpo|demo`: solar_kernels.cli finds these here, so the library never
        # imports training (each names a torch-free main(argv) -> int; see training/commands.py).
        "solar_kernels.commands": [f"{name} = training.commands:{name}" for name in ("pretrain", "sft", "dpo", "demo")],
    },
    extras_require={
        # The trainer (training/): data through Hugging Face datasets, tokenizers, loss plots.
        "train": [
            "datasets>=3",
            "transformers>=4.45",
            "matplotlib>=3.7",
        ],
        # solar convert gguf (llama.cpp GGUF files -> Hugging Face directories); the tokenizer it
        # writes is read back through transformers.
        "convert": ["gguf>=0.19", "transformers>=4.45"],
        # solar generate / chat / eval, and the lm-evaluation-harness "solar" model.
        "eval": ["datasets>=3", "transformers>=4.45", "lm_eval==0.4.13"],
        # What the test suite needs beyond the package: the trainer's, converter's and evaluator's
        # extras, pytest, and transformers (with accelerate for its GGUF loader) as the parity oracle.
        "test": [
            "datasets>=3",
            "pytest>=8",
            "pytest-timeout>=2",
            "pytest-benchmark>=4",
            "numpy>=1.26",
            "transformers>=4.45",
            "accelerate>=1",
            "matplotlib>=3.7",
            "gguf>=0.19",
            "lm_eval==0.4.13",
        ],
    },
)
