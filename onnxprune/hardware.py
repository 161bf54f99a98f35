"""What the machine's ONNX Runtime CPU kernels prefer.

ONNX Runtime's blocked (NCHWc) convolutions work on channel blocks of the
SIMD width: 16 floats with AVX-512, 8 with AVX2. Channel counts that are not
multiples of the block cost reorders and slower kernels, so pruning to
multiples of the block is what turns fewer MACs into less time (measured in
``benchmarks/results/latency.md``).
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path


@functools.lru_cache(maxsize=1)
def simd_channel_block() -> int:
    """16 on CPUs with AVX-512, else 8 (AVX2, Arm NEON and unknown machines)."""
    if platform.machine().lower() in ("x86_64", "amd64"):
        try:
            text = Path("/proc/cpuinfo").read_text(errors="ignore")
        except OSError:
            return 8
        for line in text.splitlines():
            if line.startswith("flags"):
                return 16 if " avx512f" in line else 8
    return 8


def round_to_candidates(round_to: int | str) -> list[int]:
    """``"auto"`` -> [block, block/2, ..., 4]: the largest multiple that can reach the target wins."""
    if round_to not in ("auto", "measured"):  # measured falls back to auto's multiples
        return [int(round_to)]
    block = simd_channel_block()
    out = [block]
    while out[-1] > 4:
        out.append(out[-1] // 2)
    return out


GPU_CHANNEL_STEP = 8  # tensor cores take channel counts in multiples of 8 (fp16/TF32 MMA tiles); other counts are padded


def channel_step(provider: str) -> int:
    """Channel multiple a provider's kernels run at full efficiency: the SIMD block on
    ``CPUExecutionProvider``, 8 on CUDA/TensorRT (tensor-core tiles). Latency tables are measured
    at multiples of it (and below it for groups smaller than two steps): ``channel_step("CPUExecutionProvider") -> 16``."""
    if provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        return GPU_CHANNEL_STEP
    return simd_channel_block()


def cpu_identity() -> str:
    """CPU model name and SIMD level, for keys of cached measurements (``"Intel Xeon ... avx512"``)."""
    name, flags = platform.processor() or platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="ignore").splitlines():
            if line.startswith("model name") and ":" in line:
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                have = line.split()
                flags = "avx512" if "avx512f" in have else "avx2" if "avx2" in have else "base"
    except OSError:
        pass
    return f"{name} {flags}".strip()
