"""``evaluate``: the metrics of SPEC section 6 for a twin, as JSON."""
from __future__ import annotations

HELP = "score a twin: fit (chamfer, enclosure), DRR fidelity, and against a phantom truth at another pose"


def add_arguments(p) -> None:
    p.add_argument("--twin", required=True, metavar="DIR", help="twin directory (from build)")
    p.add_argument("--truth", metavar="DIR", help="a phantom folder (from 'ctwin phantom') at the target pose")
    p.add_argument("--size", type=int, default=512, help="detector pixels of the metric views (default 512)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--out", required=True, metavar="FILE.json", help="metrics file to write")


def run(args) -> int:
    from pathlib import Path

    from ..core.twin.evaluation import evaluate_twin
    from ..core.fileio import write_json
    from ..core.progress import report
    from ..core.safety import check_out_file, clean_stale_partials

    check_out_file(args.out)
    clean_stale_partials(Path(args.out).parent)
    res = evaluate_twin(args.twin, args.truth, size=args.size, device=args.device)
    write_json(args.out, res)
    report(f"metrics written to {args.out}")
    return 0
