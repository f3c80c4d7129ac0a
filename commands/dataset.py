"""``dataset``: render a training dataset of posed DRRs from a spec, as WebDataset-style shards.

The spec format is in docs/DATASET.md. Runs on a local Ray instance by default, on an existing
Ray cluster with ``--address``, or in this process with ``--workers 0``; ``--only INDEX`` renders
one sample alone into ``OUT/samples/``. A re-run skips the shards already written.
"""
from __future__ import annotations

HELP = "render a sharded training dataset (spec file) on Ray, resumable"


def add_arguments(p) -> None:
    p.add_argument("--spec", required=True, metavar="FILE", help="dataset spec (.yaml or .json)")
    p.add_argument("--out", required=True, metavar="DIR", help="dataset folder (shards, index, twins)")
    p.add_argument("--address", metavar="ADDR", default=None,
                   help="an existing Ray cluster (host:port or 'auto'); default: a local Ray instance")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="worker actors (default: one per GPU, else one per CPU / --threads); "
                        "0 renders in this process without Ray")
    p.add_argument("--threads", type=int, default=None, metavar="T",
                   help="numba threads per worker (default: CPUs / workers)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--only", type=int, default=None, metavar="INDEX",
                   help="render this one sample alone into OUT/samples/ (KEY.tif, KEY.masks.npz, KEY.json)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over when OUT holds a dataset from another spec (built twins are kept)")


def run(args) -> int:
    import sys

    from ..core.dataset.dataset import render_only, run_dataset
    from ..core.errors import CtwinError

    if args.workers is not None and args.workers < 0:
        raise CtwinError(f"--workers must be >= 0, got {args.workers}")
    if args.threads is not None and args.threads < 1:
        raise CtwinError(f"--threads must be >= 1, got {args.threads}")
    if args.only is not None:
        path = render_only(args.spec, args.out, args.only, device=args.device, threads=args.threads)
        print(str(path), file=sys.stdout)
        return 0
    s = run_dataset(args.spec, args.out, workers=args.workers, threads=args.threads, address=args.address,
                    device=args.device, overwrite=args.overwrite)
    print(f"{s['samples']} samples rendered ({s['shards_written']} shards; "
          f"{s['shards_total']} in the dataset) in {s['seconds']:.1f} s", file=sys.stdout)
    return 0
