"""Feed a ctwin dataset to a PyTorch DataLoader. Needs torch (pip install torch; the project's
environment has the CPU build). ctwin's own reader (core.dataset.shards) needs only numpy and tifffile.

    .venv/bin/python examples/dataset_torch.py DATASET_DIR [--batch 8] [--workers 2]

Each DataLoader worker reads its own subset of the shards (shard k goes to worker k mod N), so
no sample is read twice; images come as float32 tensors (B, H, W), masks as uint8 (B, S, H, W),
and the 2D joints as (B, 24, 2) detector (col, row) pixels.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from launch import load_package  # noqa: E402

load_package("ctwin")
from ctwin.core.dataset.shards import iter_samples, shard_paths  # noqa: E402
from ctwin.core.body.skeleton import JOINT_NAMES  # noqa: E402


class CtwinShards(IterableDataset):
    """Samples of a ctwin dataset folder (or a folder of .tar shards) as tensors."""

    def __init__(self, path):
        self.shards = shard_paths(path)
        if not self.shards:
            raise SystemExit(f"no shards under {path}")

    def __iter__(self):
        info = get_worker_info()
        mine = self.shards if info is None else self.shards[info.id::info.num_workers]
        for shard in mine:
            for s in iter_samples(shard):
                pts = s["meta"].get("points", [{}])[0].get("joints", {})
                joints = np.array([pts[n]["px"] if n in pts else [np.nan, np.nan] for n in JOINT_NAMES],
                                  dtype=np.float32)
                item = {"key": s["key"], "image": torch.from_numpy(s["image"]),
                        "joints_px": torch.from_numpy(joints),
                        "pose": torch.tensor(s["meta"]["pose"], dtype=torch.float32)}
                if "masks" in s:
                    item["masks"] = torch.from_numpy(s["masks"])
                yield item


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args(argv)
    loader = DataLoader(CtwinShards(a.dataset), batch_size=a.batch, num_workers=a.workers)
    n = 0
    for batch in loader:
        n += len(batch["key"])
        print(f"batch: image {tuple(batch['image'].shape)} {batch['image'].dtype}, "
              f"masks {tuple(batch['masks'].shape) if 'masks' in batch else None}, "
              f"joints {tuple(batch['joints_px'].shape)}, keys {batch['key'][0]}..{batch['key'][-1]}")
    print(f"{n} samples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
