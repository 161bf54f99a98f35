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
    if round_to != "auto":
        return [int(round_to)]
    block = simd_channel_block()
    out = [block]
    while out[-1] > 4:
        out.append(out[-1] // 2)
    return out
