"""Every Triton kernel compiles for sm_90 (H100/H200) and sm_80 (A100) with the arguments its
launcher really passes: the interpreter used by the other CPU tests would not catch GPU-compiler
errors. Runs in a subprocess because this process has TRITON_INTERPRET=1."""

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("compile_for_gpu.py")


def test_kernels_compile_for_hopper_and_ampere():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "90", "80"], env=env, capture_output=True, text=True, timeout=900,
        cwd=SCRIPT.parents[2],
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("sm_")]
    kernels = {line.split()[1] for line in lines}
    assert kernels == {
        "_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel", "_swiglu_fwd_kernel", "_swiglu_bwd_kernel",
        "_rotary_kernel", "_logprobs_kernel",
    }
    for arch in ("sm_90", "sm_80"):
        for dtype in ("*bf16", "*fp16", "*fp32"):
            assert any(line.startswith(arch) and dtype in line for line in lines), (arch, dtype)
