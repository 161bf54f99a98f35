"""Share of MACs onnxprune can prune, per reference model and exporter.

    python benchmarks/prunable_share.py [--quick]

Exports every model of ``models/zoo.py`` (width 1.0; ResNet-50 at 224x224)
with both torch exporters, runs the channel-group analysis and prints a
markdown table, also written to ``benchmarks/results/prunable_share.md``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402

from models.export import EXPORTERS, export_onnx  # noqa: E402
from models.zoo import ZOO, build  # noqa: E402
from onnxprune.groups import find_groups  # noqa: E402

from benchmarks import provenance  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="legacy exporter only, no ResNet-50")
    args = ap.parse_args()
    prov = provenance.start(script="benchmarks/prunable_share.py")
    exporters = ("legacy",) if args.quick else EXPORTERS
    rows = ["| model | exporter | MACs | groups | prunable groups | prunable MACs share | blocked (reasons) | analysis s |", "|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in ZOO:
            if args.quick and name == "resnet50":
                continue
            for exp in exporters:
                model, shape = build(name, width=1.0)
                path = export_onnx(model, Path(tmp) / f"{name}_{exp}.onnx", input_shape=shape, exporter=exp)
                m = onnx.load(str(path))
                t = time.perf_counter()
                cg = find_groups(m)
                dt = time.perf_counter() - t
                reasons = sorted({g.blocked_reason.split("'")[0].strip() for g in cg.groups if g.blocked_reason})
                rows.append(
                    f"| {name} | {exp} | {cg.total_macs:,} | {len(cg.groups)} | {len(cg.prunable_groups)} | "
                    f"{cg.prunable_macs_share:.1%} | {'; '.join(reasons)} | {dt:.2f} |"
                )
                print(rows[-1], flush=True)
    text = "# Prunable MACs per reference model\n\n" + "\n".join(prov.header()) + "\n\nMACs: Conv/ConvTranspose/Gemm/MatMul multiply-accumulates per sample.\n" \
        "Analysis s: one `find_groups()` call on the shared machine above (load-dependent).\n" \
        "Prunable share: MACs of compute nodes whose weights at least one prunable group slices.\n\n" + "\n".join(rows) + "\n"
    out = ROOT / "benchmarks" / "results" / "prunable_share.md" if not args.quick else Path(tempfile.gettempdir()) / "prunable_share_quick.md"
    provenance.write_atomic(out, text)
    print(text)


if __name__ == "__main__":
    main()
