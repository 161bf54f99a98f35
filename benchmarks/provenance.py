"""How a results file was made: the header every ``benchmarks/results/*.md`` starts with.

A benchmark script calls :func:`start` before its work (it records the time and
the load average) and :func:`header` when it renders; :func:`write_atomic`
replaces the results file in one step, so a killed run never leaves half a file::

    prov = provenance.start()
    ...
    text = "# Title\\n\\n" + "\\n".join(prov.header()) + "\\n\\n" + body
    provenance.write_atomic(out_path, text)

The header states the exact command line, the source commit (``+dirty`` when
tracked files differ from it), the date, the machine (CPU model, logical cores,
SIMD level, 1-minute load average at start and end) and the library versions.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def source_commit() -> str:
    """``git rev-parse --short HEAD``, with ``+dirty`` when a tracked file differs; ``unknown`` outside git."""
    rev = _git("rev-parse", "--short", "HEAD")
    if not rev:
        return "unknown (not a git checkout)"
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return rev + ("+dirty" if dirty else "")


def load_average() -> float:
    """1-minute load average (NaN where the OS has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def cpu_model() -> str:
    """CPU model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="ignore").splitlines():
            if line.startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def simd_level() -> str:
    """SIMD level and the channel multiple ``--round-to auto`` starts from on this CPU."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from onnxprune.hardware import cpu_identity, simd_channel_block

    level = cpu_identity().rsplit(" ", 1)[-1]
    level = level if level in ("avx512", "avx2", "base") else "SIMD level unknown"
    return f"{level}, `--round-to auto` starts at {simd_channel_block()}"


def versions() -> str:
    """Python, numpy, onnx, onnxruntime and (if importable) torch versions."""
    parts = [f"Python {platform.python_version()}"]
    for mod in ("numpy", "onnx", "onnxruntime", "torch"):
        try:
            m = __import__(mod)
        except ImportError:
            parts.append(f"{mod} not installed")
            continue
        extra = ""
        if mod == "torch":
            extra = f" ({m.get_num_threads()} intra-op thread(s))"
        parts.append(f"{mod} {getattr(m, '__version__', '?')}{extra}")
    return ", ".join(parts)


def command_line(script: str | None = None, argv: list[str] | None = None) -> str:
    """``python benchmarks/x.py args`` as it was run (``argv``: the arguments after the script)."""
    script = script or sys.argv[0]
    try:
        script = str(Path(script).resolve().relative_to(ROOT))
    except ValueError:
        pass
    args = list(sys.argv[1:] if argv is None else argv)
    return "python " + shlex.join([script, *args])


@dataclass
class Provenance:
    """Started at the beginning of a run; :meth:`header` renders it at the end."""

    command: str
    commit: str
    started: _dt.datetime
    load_start: float
    notes: list[str] = field(default_factory=list)

    def header(self, *, load_end: float | None = None) -> list[str]:
        """The lines every results file starts with (markdown, one fact per line)."""
        end = load_average() if load_end is None else load_end
        wall = (_dt.datetime.now(_dt.timezone.utc) - self.started).total_seconds()
        lines = [
            f"- Command: `{self.command}`",
            f"- Source: commit `{self.commit}` (`git rev-parse --short HEAD`; `+dirty`: tracked files differed from it)",
            f"- Date: {self.started:%Y-%m-%d %H:%M} UTC, run took {wall / 60:.1f} min",
            f"- Machine: {cpu_model()}, {os.cpu_count()} logical cores ({simd_level()}), shared with other jobs: "
            f"1-min load average {self.load_start:.2f} at the start, {end:.2f} at the end",
            f"- Versions: {versions()}",
        ]
        return lines + [f"- {n}" for n in self.notes]


def start(*, script: str | None = None, argv: list[str] | None = None) -> Provenance:
    """Record the command, commit, time and load average at the start of a run."""
    return Provenance(command_line(script, argv), source_commit(), _dt.datetime.now(_dt.timezone.utc), load_average())


def _file_mode(path: Path) -> int:
    """The existing file's permissions, else what ``open()`` would give a new file (0666 minus the umask)."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_atomic(path: Path | str, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, _file_mode(path))  # mkstemp makes 0600; a results file is as readable as any other
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
