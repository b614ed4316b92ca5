"""Usage: python tools/compile_for_gpu.py SM [SM ...] [--json FILE] [--out DIR] (e.g. 90 80, no GPU needed)

Compiles every kernel for real GPUs on a machine without one, and reads the compiled code:

    python tools/compile_for_gpu.py 90 80                         # compile; one line per kernel variant
    python tools/compile_for_gpu.py 90 80 --json report.json      # and write everything read
    python tools/compile_for_gpu.py 90 80 --out benchmarks/results  # the static half of the GPU results

Triton kernels: each host launcher runs at SOLAR shapes (d 4096, I 14336, 32/8 heads of 128, vocab
32000, 16K tokens; bf16, fp16 and fp32) on CPU tensors that are never touched (``torch.empty``, 64-byte
aligned like CUDA's), the launch is caught instead of run, and the kernel is compiled through Triton's
own JIT binder (``create_function_from_signature`` + ``JITFunction._pack_args``, the path of
``JITFunction.run`` in triton 3.4-3.8): the same specialization a real launch gets (16-byte pointer
alignment, integers divisible by 16, ``== 1`` values), so PTX, SASS and register counts are those of
the GPU. ``triton.compile`` with an explicit ``GPUTarget`` needs no driver.

CUDA kernels (csrc/*.cu), when nvcc is here: ``nvcc -cubin -arch=sm_90a``, then the cuobjdump that
ships with Triton (``-res-usage``, ``--dump-sass``). The launch sizes of the CUDA kernels at SOLAR
shapes follow the launchers in csrc/*.cu (``CUDA_LAUNCHES`` below).

Per variant it reads: registers, stack and local memory, shared memory, 128-bit global loads and
stores (``LDG.E.128``/``STG.E.128`` in SASS, ``ld/st.global.v4`` in PTX), fp64 and local-memory
instructions, and for the SOLAR bf16 launches the resident programs per SM and the waves on an
H100/H200's 132 SMs. tests/ops/test_gpu_compile.py holds the expectations. Run without
TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit(
        "compile_for_gpu: run without TRITON_INTERPRET=1 (compiled kernels are needed), got TRITON_INTERPRET=1"
    )

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from solar_kernels.checkpoint import SHORT_DTYPE_NAMES  # noqa: E402
from solar_kernels.model.config import PRESETS  # noqa: E402
from solar_kernels.ops import _registry  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger(__name__)

SMS = 132  # H100 SXM / H200
REGISTERS_PER_SM = 65536
MAX_THREADS_PER_SM = 2048
MAX_BLOCKS_PER_SM = 32
SHARED_PER_SM = 228 * 1024
SOLAR = {"tokens": 16384, "d": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8, "head_dim": 128, "vocab": 32000}
FP64 = re.compile(r"^(DADD|DMUL|DFMA|DSETP|DSET|DMNMX|DMMA)\b|^MUFU\.(RSQ|RCP)64H|^(F2F|I2F|F2I)\.\S*F64")


@dataclass
class Launch:
    """One caught launch: the kernel, its arguments, the grid and what it stands for."""

    case: str
    dtype: str
    fn: object
    args: tuple
    kwargs: dict
    grid: tuple
    solar: bool  # a SOLAR-shaped bf16 launch: part of the report's table

    @property
    def programs(self) -> int:
        return math.prod(self.grid)


@dataclass
class Variant:
    """What the compiled code of one kernel variant says."""

    backend: str
    kernel: str
    arch: str
    case: str
    dtype: str
    config: dict
    threads: int
    programs: int | None
    registers: int | None = None
    stack_bytes: int | None = None
    local_bytes: int | None = None
    shared_bytes: int = 0
    ldg128: int = 0  # 128-bit global reads in SASS: LDG.E.128 and the async copies below
    ldgsts128: int = 0  # of which 16-byte cp.async copies to shared memory (LDGSTS, a pipelined loop's prefetch)
    stg128: int = 0
    ptx_ld_v4: int | None = None
    ptx_st_v4: int | None = None
    fp64: int = 0
    local_instructions: int = 0
    solar: bool = False
    extra: dict = field(default_factory=dict)

    def occupancy(self) -> dict:
        """Resident programs per SM (registers, threads, shared memory, block limit) and waves on 132 SMs."""
        if self.registers is None:
            return {}
        warps = max(1, self.threads // 32)
        regs_per_warp = math.ceil(max(self.registers, 1) * 32 / 256) * 256  # allocated per warp in 256s
        by_regs = REGISTERS_PER_SM // (regs_per_warp * warps)
        by_threads = MAX_THREADS_PER_SM // (warps * 32)
        by_shared = SHARED_PER_SM // self.shared_bytes if self.shared_bytes else MAX_BLOCKS_PER_SM
        resident = max(0, min(by_regs, by_threads, by_shared, MAX_BLOCKS_PER_SM))
        out = {"resident_per_sm": resident, "occupancy": resident * warps / 64}
        if self.programs and resident:
            out["waves"] = self.programs / (resident * SMS)
        return out

    def as_dict(self) -> dict:
        row = {k: v for k, v in self.__dict__.items() if k != "extra"}
        return {**row, **self.occupancy(), **self.extra}


class _Capture:
    """Stands in for a JITFunction: ``kernel[grid](*args, **kwargs)`` records instead of launching."""

    def __init__(self, fn, launches, context):
        self.fn, self.launches, self.context = fn, launches, context

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            case, dtype, solar = self.context
            shape = tuple(grid(dict(zip(self.fn.arg_names, args), **kwargs)) if callable(grid) else grid)
            self.launches.append(Launch(case, dtype, self.fn, args, kwargs, shape, solar))

        return record


def _empty(*shape, dtype):
    return torch.empty(*shape, dtype=dtype)


def triton_launches() -> tuple[list[Launch], list[str]]:
    """Drive every Triton launcher of the kernel registry at SOLAR shapes (and the launches a record
    lists besides: RMSNorm's wide two-pass rows, its residual variant and autocast's dtypes); catch
    the launches. Returns them and the name of every ``*_kernel`` of the registry's op
    files (what the report must hold a variant of)."""
    names = _registry.families()
    missing = [name for name in names if not _records_of(name)]
    if missing:
        raise SystemExit(
            f"compile_for_gpu: no SOLAR launch for the kernels of {missing}: give their records an Op "
            f"(register_op) or a shape_of"
        )
    modules = {name: importlib.import_module(f"solar_kernels.ops.{name}") for name in names}
    launches: list[Launch] = []
    context = ["", "", False]
    originals = {}
    for module in modules.values():
        for attr in dir(module):
            obj = getattr(module, attr)
            if isinstance(obj, triton.runtime.JITFunction) and attr.endswith("_kernel"):
                originals[(module, attr)] = obj
                setattr(module, attr, _Capture(obj, launches, context))
    rms = modules["rms_norm"]
    programs_fn = getattr(rms, "persistent_programs", None)
    if programs_fn is not None:  # the persistent grid of an H100/H200, not the interpreter's
        rms.persistent_programs = lambda device, work, per_sm=4: max(1, min(work, SMS * per_sm))
    try:
        _drive(names, context)
    finally:
        for (module, attr), obj in originals.items():
            setattr(module, attr, obj)
        if programs_fn is not None:
            rms.persistent_programs = programs_fn
    return launches, sorted(obj.__name__ for obj in originals.values())


def _records_of(family: str) -> list[tuple[str, int, int, _registry.Kernel]]:
    """(what the width is, rows, width, record) of each SOLAR launch of the family's out-variant
    records: SOLAR's tokens of the op's model width, or a record's own ``shape_of`` (the log-prob
    row step's chunk of the vocabulary)."""
    config = PRESETS["solar-10.7b"]
    found = [
        (op.width, SOLAR["tokens"], op.model_width(config), kernel)
        for op in _registry.ops()
        for kernel in op.kernels
        if kernel.family == family
    ]
    covered = {kernel.name for *_, kernel in found}
    for kernel in _registry.kernels():
        if kernel.family == family and kernel.shape_of is not None and kernel.name not in covered:
            rows, width = kernel.shape_of(config, SOLAR["tokens"])
            found.append((f"rows={rows} width", rows, width, kernel))
    return found


def _drive_records(family, context, dtype, name, solar) -> None:
    """Out-variant records: each Triton launcher on its example inputs at SOLAR's shape, once per
    variant of its non-tensor options, or on the launches its record lists (``compile_launches``)."""
    for what, rows, width, kernel in _records_of(family):
        if kernel.compile_launches is not None:
            for label, at_solar, inputs, options in kernel.compile_launches(rows, width, dtype, _empty):
                context[:] = [label, name, solar and at_solar]
                kernel.launch("triton", *inputs, **options)
            continue
        inputs = kernel.example(rows, width, dtype, "cpu", torch.empty)
        for options in kernel.variants:
            label = "".join(f" {key}={value}" for key, value in options.items())
            context[:] = [f"{kernel.name} {what}={width}{label}", name, solar]
            kernel.launch("triton", *inputs, **options)


def _drive(families, context) -> None:
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        name, solar = SHORT_DTYPE_NAMES[dtype], dtype == torch.bfloat16
        for family in families:
            _drive_records(family, context, dtype, name, solar)


def _tool(name: str) -> str | None:
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(bundled) if bundled.exists() else shutil.which(name)


def _run(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:2])} failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout


def read_cubin(path: str) -> dict[str, dict]:
    """Per function in a cubin: registers, stack, local and shared bytes, and SASS instruction counts."""
    cuobjdump = _tool("cuobjdump")
    if cuobjdump is None:
        raise RuntimeError("no cuobjdump (triton ships one under backends/nvidia/bin)")
    functions: dict[str, dict] = {}
    current = None
    for line in _run([cuobjdump, "-res-usage", path]).splitlines():
        found = re.search(r"Function (\S+):", line)
        if found:
            current = functions.setdefault(found.group(1), {})
        elif current is not None and "REG:" in line:
            fields = dict(re.findall(r"(\w+):(\d+)", line))
            current.update(
                registers=int(fields["REG"]),
                stack_bytes=int(fields.get("STACK", 0)),
                shared_bytes=int(fields.get("SHARED", 0)),
                local_bytes=int(fields.get("LOCAL", 0)),
            )
    current = None
    for line in _run([cuobjdump, "--dump-sass", path]).splitlines():
        found = re.search(r"Function : (\S+)", line)
        if found:
            current = functions.setdefault(found.group(1), {})
            current.update(ldg128=0, ldgsts128=0, stg128=0, fp64=0, local_instructions=0)
            continue
        instruction = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if current is None or instruction is None:
            continue
        opcode = instruction.group(1)
        current["ldg128"] += opcode.startswith("LDG") and ".128" in opcode  # LDGSTS (cp.async) included
        current["ldgsts128"] += opcode.startswith("LDGSTS") and ".128" in opcode
        current["stg128"] += opcode.startswith("STG") and ".128" in opcode
        current["fp64"] += bool(FP64.match(opcode))
        current["local_instructions"] += opcode.startswith(("LDL", "STL"))
    return functions


def _specialize(fn, args, kwargs, backend):
    """(signature, constexprs, attrs, options) exactly as ``JITFunction.run`` builds them for these arguments."""
    if not hasattr(fn, "_pack_args"):
        raise RuntimeError(
            f"triton {triton.__version__}: JITFunction has no _pack_args (this script follows triton 3.4-3.8)"
        )
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(
        backend, {**kwargs, "debug": False}, bound, specialization, options
    )
    return signature, constexprs, attrs, options


def compile_triton(launches: list[Launch], archs: list[int]) -> list[Variant]:
    variants, seen = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            target = GPUTarget("cuda", arch, 32)
            backend = make_backend(target)
            for launch in launches:
                signature, constexprs, attrs, options = _specialize(launch.fn, launch.args, launch.kwargs, backend)
                key = (arch, launch.fn.__name__, str(signature), str(constexprs), str(attrs), str(options.__dict__))
                if key in seen:  # same binary: keep the SOLAR label if this launch has one
                    if launch.solar and not seen[key].solar:
                        seen[key].solar, seen[key].case, seen[key].programs = True, launch.case, launch.programs
                    continue
                compiled = triton.compile(
                    ASTSource(launch.fn, signature, constexprs, attrs), target=target, options=options.__dict__
                )
                cubin = Path(tmp) / f"{launch.fn.__name__}_{len(variants)}.cubin"
                cubin.write_bytes(compiled.asm["cubin"])
                (info,) = read_cubin(str(cubin)).values()
                ptx = compiled.asm["ptx"]
                named = {launch.fn.arg_names[path[0]]: value for path, value in constexprs.items() if len(path) == 1}
                variant = Variant(
                    backend="triton",
                    kernel=launch.fn.__name__,
                    arch=f"sm_{arch}",
                    case=launch.case,
                    dtype=launch.dtype,
                    config={
                        **{k: v for k, v in named.items() if k.isupper()},
                        "num_warps": options.num_warps,
                        "num_stages": options.num_stages,
                    },
                    threads=32 * options.num_warps,
                    programs=launch.programs if launch.solar else None,
                    ptx_ld_v4=len(re.findall(r"ld\.global(?:\.\w+)*\.v4", ptx)),
                    ptx_st_v4=len(re.findall(r"st\.global(?:\.\w+)*\.v4", ptx)),
                    solar=launch.solar,
                    **{**info, "shared_bytes": max(info.get("shared_bytes", 0), compiled.metadata.shared)},
                )
                seen[key] = variant
                variants.append(variant)
    return variants


def _threads_for(items: int, per_thread: int, max_threads: int) -> int:
    """csrc/common.cuh's threads_for."""
    threads = -(-items // per_thread)
    return max(32, min(max_threads, -(-threads // 32) * 32))


def cuda_launches() -> dict[str, tuple[int, int]]:
    """Demangled CUDA kernel name -> (threads, blocks) of its SOLAR bf16 launch, as csrc/*.cu's launchers pick them."""
    n, d, inter, vocab = SOLAR["tokens"], SOLAR["d"], SOLAR["intermediate"], SOLAR["vocab"]
    bf16, vec = "__nv_bfloat16", 8
    fwd_threads = _threads_for(d // vec, 4, 1024)  # kFwdCached, kFwdMaxThreads
    bwd_threads = _threads_for(d // vec, 2, 512)  # kBwdCached, kBwdMaxThreads
    bwd_blocks = min(n, SMS * (1024 // bwd_threads))  # rms_norm_bwd_blocks
    group = math.isqrt(bwd_blocks - 1) + 1  # column_sum_group
    column_blocks = -(-d // 256)  # kColumnSumThreads
    rotary_tokens = 256 // (SOLAR["head_dim"] // 2 // vec)  # kThreads / packs of a half
    rotary_blocks = -(-n // rotary_tokens) * -(-(SOLAR["heads"] + SOLAR["kv_heads"]) // 8)
    swiglu_blocks = n * -(-(inter // vec) // 256)
    chunk = min(4096, 2**28 // vocab, (n - 1) // 2)
    launches = {}
    for residual in ("false", "true"):
        launches[f"rms_norm_fwd_kernel<{bf16}, {bf16}, 8, {residual}>"] = (fwd_threads, n)
        launches[f"rms_norm_bwd_kernel<{bf16}, {bf16}, 8, {residual}>"] = (bwd_threads, bwd_blocks)
    launches["column_sum_groups_kernel"] = (256, column_blocks * -(-bwd_blocks // group))
    launches[f"column_sum_kernel<{bf16}>"] = (256, column_blocks)
    launches[f"rotary_kernel<{bf16}, {bf16}, 8>"] = (256, rotary_blocks)
    launches[f"swiglu_fwd_kernel<{bf16}, 8>"] = (256, swiglu_blocks)
    launches[f"swiglu_bwd_kernel<{bf16}, 8>"] = (256, swiglu_blocks)
    launches[f"logprobs_kernel<{bf16}, long, 8>"] = (_threads_for(vocab // vec, 4, 512), chunk)
    return launches


def _demangle(names: list[str]) -> list[str]:
    filt = shutil.which("c++filt") or shutil.which("cu++filt")
    if filt is None:
        raise RuntimeError("no c++filt to read the CUDA kernels' names (binutils)")
    return subprocess.run(
        [filt], input="\n".join(names), capture_output=True, text=True, check=True
    ).stdout.splitlines()


def compile_cuda(arch: str = "90a") -> list[Variant]:
    """Every kernel of csrc/*.cu for sm_<arch>; the SOLAR bf16 launches carry their launch sizes."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise RuntimeError("no nvcc on PATH")
    solar = cuda_launches()
    variants = []
    with tempfile.TemporaryDirectory() as tmp:
        for source in sorted((ROOT / "csrc").glob("*.cu")):
            cubin = Path(tmp) / f"{source.stem}.cubin"
            _run([nvcc, "-cubin", f"-arch=sm_{arch}", "-O3", f"-I{ROOT / 'csrc'}", str(source), "-o", str(cubin)])
            functions = read_cubin(str(cubin))
            for mangled, readable in zip(functions, _demangle(list(functions))):
                # "void solar::(anonymous namespace)::rotary_kernel<__nv_bfloat16, ...>(solar::Rotary<...>, ...)"
                name = readable.replace("(anonymous namespace)::", "").removeprefix("void ").removeprefix("solar::")
                name = name.split("(")[0]
                short = name.split("<")[0]
                threads, blocks = solar.get(name, (None, None))
                dtype = "bf16" if "__nv_bfloat16" in name else "fp16" if "__half" in name else "fp32"
                variants.append(
                    Variant(
                        backend="cuda",
                        kernel=short,
                        arch=f"sm_{arch}",
                        case=name,
                        dtype=dtype,
                        config={"source": source.name},
                        threads=threads or 0,
                        programs=blocks,
                        solar=name in solar,
                        **functions[mangled],
                    )
                )
    return variants


def _versions() -> dict[str, str]:
    nvcc = shutil.which("nvcc")
    release = None
    if nvcc:
        found = re.search(
            r"release ([\d.]+)", subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
        )
        release = found.group(1) if found else None
    commit = os.environ.get("SOLAR_KERNELS_COMMIT")
    if commit is None and shutil.which("git") and (ROOT / ".git").exists():
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    return {
        "date": datetime.date.today().isoformat(),
        "commit": commit or "unknown",
        "triton": triton.__version__,
        "torch": torch.__version__,
        "nvcc": release or "none",
    }


def markdown(report: dict) -> str:
    """The short table of the SOLAR bf16 launches (sm_90 / sm_90a)."""
    env = report["environment"]
    lines = [
        "# Compiled code of the kernels at SOLAR shapes (bf16, 16K tokens), sm_90",
        "",
        f"{env['date']}, commit {env['commit']}, triton {env['triton']}, nvcc {env['nvcc']}; "
        f"`python tools/compile_for_gpu.py 90 80 --out benchmarks/results`. Occupancy from registers, threads "
        f"and shared memory; waves on {SMS} SMs.",
        "",
        "128-bit ld counts LDG.E.128 and LDGSTS.128 (cp.async into shared memory, the prefetch of a software-"
        "pipelined loop), the latter also shown apart.",
        "",
        "| backend | kernel | case | threads | registers | stack | 128-bit ld/st (SASS) | of which cp.async | fp64 | "
        "resident/SM | occupancy | programs | waves |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["variants"]:
        if not row["solar"] or row["arch"] not in ("sm_90", "sm_90a"):
            continue
        waves = f"{row['waves']:.2f}" if row.get("waves") is not None else "–"
        occupancy = f"{row['occupancy']:.0%}" if row.get("occupancy") is not None else "–"
        lines.append(
            f"| {row['backend']} | {row['kernel']} | {row['case']} | {row['threads']} | {row['registers']} | "
            f"{row['stack_bytes']} | {row['ldg128']} / {row['stg128']} | {row['ldgsts128']} | {row['fp64']} | "
            f"{row.get('resident_per_sm', '–')} | {occupancy} | {row['programs']} | {waves} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("archs", nargs="*", type=int, default=[90], help="Triton targets (default 90)")
    parser.add_argument("--no-cuda", action="store_true", help="skip the CUDA kernels of csrc/")
    parser.add_argument("--json", help="write every variant read to this file")
    parser.add_argument("--out", help="folder for compiled-<date>.json and compiled-<date>.md (benchmarks/results)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.time()
    launches, triton_kernels = triton_launches()
    variants = compile_triton(launches, args.archs)
    if not args.no_cuda:
        variants += compile_cuda()
    for v in variants:
        print(
            f"{v.arch} {v.kernel} *{v.dtype} {v.case} {v.config}: REG:{v.registers} STACK:{v.stack_bytes} "
            f"LDG128:{v.ldg128} (LDGSTS128:{v.ldgsts128}) STG128:{v.stg128} FP64:{v.fp64}"
        )
    print(f"compiled {len(variants)} kernel variants in {time.time() - start:.1f} s")
    report = {
        "environment": _versions(),
        "sms": SMS,
        "triton_kernels": triton_kernels,
        "variants": [v.as_dict() for v in variants],
    }
    text = json.dumps(report, indent=2, default=str) + "\n"
    if args.json:
        Path(args.json).write_text(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"compiled-{report['environment']['date']}"
        stem.with_suffix(".json").write_text(text)
        stem.with_suffix(".md").write_text(markdown(report))
        print(f"wrote {stem}.json, {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
