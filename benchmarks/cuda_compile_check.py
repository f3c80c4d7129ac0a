"""Compile the CUDA DRR, scene, scene-composition and posing kernels to PTX without a GPU, and count their registers.

    LD_LIBRARY_PATH=$T/nvidia/cuda_nvrtc/lib:$T/nvidia/cuda_nvcc/nvvm/lib64 CUDA_HOME=$T/nvidia/cuda_nvcc \\
        PYTHONPATH=$T .venv/bin/python benchmarks/cuda_compile_check.py [--cc 9.0] [--ptxas PATH]

numba's CUDA simulator (the tests) runs the kernels as Python and types nothing; this script runs
numba-cuda's real typing and NVVM code generation for a compute capability, so a kernel that would
not compile on a GPU fails here. Needs NVVM and NVRTC, not a GPU or a driver: e.g.
``pip install --no-deps --target $T nvidia-cuda-nvcc-cu12 nvidia-cuda-nvrtc-cu12`` (not project
requirements). With ``ptxas`` (in the nvcc package's bin/) it prints each kernel's registers per
thread (ptxas -v), which bound the occupancy. numba-cuda asks the current device for its compute
capability when it compiles a device function; here that question is answered with ``--cc``.
Prints measured facts only.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from launch import load_package  # noqa: E402

load_package("ctwin")


def signatures(numba):
    f64, i64 = numba.float64, numba.int64
    vol = (numba.int16[::1], numba.float32[::1], f64, f64, f64, i64, i64, i64)
    out2, out3 = numba.float32[:, ::1], numba.float32[:, :, ::1]
    geo, geos, occ = numba.float64[::1], numba.float64[:, ::1], numba.uint8[::1]
    return {
        "cuda_static": (out2, geo) + vol + (numba.float64[::1], occ, f64, i64),
        "cuda_batch": (out3, geos) + vol + (numba.float64[:, ::1], occ, numba.float64[::1], i64, i64),
        "cuda_scene": (out2, geo, numba.int16[::1], numba.float32[::1], f64, f64, f64, numba.int64[::1],
                       numba.float64[::1], numba.boolean, numba.float32[:, :, :, ::1], numba.float64[::1],
                       numba.int64[::1], numba.int16[::1], occ, numba.float32[::1], f64, f64, f64,
                       numba.float64[:, ::1], i64, f64),
    }


def compose_signatures(numba):
    """The scene-composition kernels (``kernels.compose_cuda_kernels``) as ``projector._compose_cuda``
    launches them."""
    f64, i64 = numba.float64, numba.int64
    i16, u8, idx = numba.int16[::1], numba.uint8[::1], numba.int64[::1]
    grid3, m34, ib = numba.uint8[:, :, ::1], numba.float64[:, ::1], numba.int64[:, ::1]
    return {
        "cuda_compose_warp": (i16, grid3, idx, idx, i16, idx, grid3, numba.int32[:, :, ::1], m34, m34, idx,
                              numba.float32[:, :, :, ::1], m34, f64, grid3, numba.boolean),
        "cuda_compose_subs": (i16, grid3, idx, idx, i16, u8, idx, ib, numba.float64[:, :, ::1], ib, ib, idx, ib, idx,
                              f64, i64, i64, i64, i64),
        "cuda_mark_boxes": (grid3, ib),
        "cuda_restore_blocks": (i16, idx, idx, i16, idx, grid3, i64, i64),
        "cuda_fill_u8": (u8, u8, i64),
        "cuda_clean_occ": (u8, u8) + (i64,) * 9,
        "cuda_refine_occ": (i16, idx, f64, grid3),
    }


def posing_signatures(numba):
    """The posing kernels (``articulated.posing_cuda_kernels``): the pose-blended weight field, forward
    skinning of the tissue points, inverse skinning at the warp nodes, the air border."""
    f64, i64 = numba.float64, numba.int64
    idx, v1, m34 = numba.int64[::1], numba.float64[::1], numba.float64[:, ::1]
    pts, mats, disp = numba.float64[:, ::1], numba.float64[:, :, ::1], numba.float32[:, ::1]
    return {
        "cuda_blend_field": (idx, idx, v1, mats, m34, v1),
        "cuda_forward_blend": (pts, i64, i64, i64, m34, v1, m34, mats, pts, mats),
        "cuda_fill_nearest": (v1, idx),
        "cuda_splat_nearest": (pts, idx, idx, v1, m34, m34, idx, f64, v1, idx),
        "cuda_inverse_lbs_nodes": (m34, idx, i64, i64, i64, m34, v1, m34, mats, numba.uint8[:, :, ::1], idx, mats,
                                   i64, f64, f64, disp, v1, numba.int8[::1]),
        "cuda_border_mark": (idx, numba.int8[::1], disp, f64),
        "cuda_border_air": (numba.int8[::1], disp),
        # a pose's bounds, slab order and summary on the device (only the joint transforms cross)
        "cuda_point_bounds": (pts, m34, v1),
        "cuda_fill_scalars": (v1, i64, i64, f64, f64),
        "cuda_fill_scalars:int64": (idx, i64, i64, i64, i64),
        "cuda_slab_keys": (pts, m34, i64, i64, v1, idx, numba.int64[:, ::1]),
        "cuda_slab_scan": (numba.int64[:, ::1], i64, i64, idx),
        "cuda_slab_starts": (idx, i64),
        "cuda_slab_scatter": (idx, i64, numba.int64[:, ::1], idx, idx),
        "cuda_warp_summary": (numba.int8[::1], v1, v1),
        "cuda_select_init": (v1, f64, idx),
        "cuda_select_hist": (numba.int8[::1], idx, idx, i64, idx),
        "cuda_select_pick": (idx, idx, i64),
        "cuda_select_next": (numba.int8[::1], v1, idx, idx, v1),
    }


def registers(ptxas: str, arch: str, ptx: str) -> str:
    """ptxas -v's registers per thread of the kernel in ``ptx``. NVVM may emit a newer PTX ISA
    version than this ptxas reads; the kernels use nothing newer, so the header is then lowered to
    the version ptxas names."""
    import os

    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "kernel.ptx"
        p.write_text(ptx)
        r = subprocess.run([ptxas, f"-arch={arch}", "-v", str(p), "-o", os.devnull], capture_output=True, text=True)
        m = re.search(r"current version is '([\d.]+)'", r.stderr)
        if m:
            p.write_text(re.sub(r"^\.version [\d.]+", f".version {m.group(1)}", ptx, flags=re.M))
            r = subprocess.run([ptxas, f"-arch={arch}", "-v", str(p), "-o", os.devnull], capture_output=True,
                               text=True)
    regs = re.search(r"Used (\d+) registers", r.stdout + r.stderr)
    return f"{regs.group(1)} registers per thread" if regs else f"ptxas: {r.stderr.strip()[-200:]}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cc", default="9.0", help="compute capability, e.g. 9.0 (H100, H200) or 8.9")
    ap.add_argument("--ptxas", help="ptxas to count registers (default: next to CUDA_HOME's nvvm)")
    args = ap.parse_args()
    cc = tuple(int(x) for x in args.cc.split("."))
    import os

    import numba
    from numba import cuda
    import numba.cuda.dispatcher as dispatcher

    class _Device:
        compute_capability = cc

    dispatcher.get_current_device = lambda: _Device()  # device functions compile for --cc
    from ctwin.core.drr import kernels as K
    from ctwin.core.twin import articulated as A

    extra = {"cuda": cuda, "numba": numba}
    ns = K._build(lambda f: cuda.jit(device=True)(f), extra)
    cns = K.compose_cuda_namespace(lambda f: cuda.jit(device=True)(f), extra)
    ptxas = args.ptxas or str(Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "ptxas")
    jobs = [(n, sig, ns, K) for n, sig in signatures(numba).items()]
    jobs += [(n, sig, cns, K) for n, sig in compose_signatures(numba).items()]
    pns = A.posing_cuda_namespace(lambda f: cuda.jit(device=True)(f), extra)
    jobs += [(n, sig, pns, A) for n, sig in posing_signatures(numba).items()]
    for label, sig, ns, mod in jobs:
        name = label.split(":")[0]  # "name:variant": one kernel under another signature
        f = getattr(mod, name)
        ptx, _ = cuda.compile_ptx(types.FunctionType(f.__code__, ns, name), sig, cc=cc)
        name = label
        rec = f"{name}: PTX {len(ptx)} chars for sm_{cc[0]}{cc[1]}"
        if Path(ptxas).exists():
            rec += ", " + registers(ptxas, f"sm_{cc[0]}{cc[1]}", ptx)
        print(rec, flush=True)


if __name__ == "__main__":
    main()
