"""Primary polychromatic images of core.xray against gVirtualXray (the validated peer) in one run.

    .venv/bin/python benchmarks/bench_gvxr.py [--size 256] [--voxel 1.0]

Install the peer (optional; not needed by ctwin):
    pip install gvxr==2.1.0
    apt-get install libegl1 libgl1 libxcb-ewmh2 libxcb-composite0 libxcb-xinerama0 \
        libxcb-keysyms1 libxcb-icccm4 libxcb-res0
gVirtualXray runs headless with Mesa's EGL (llvmpipe, no GPU needed).

Scene: a water/bone step phantom of axis-aligned boxes (faces on whole millimetres, so the
voxelised copy at ``--voxel`` mm has no partial volume): water steps 20-200 mm thick, cortical
bone (ICRP, 1.85 g/cm3) steps 5-40 mm, and bone on 100 mm of water. Both renderers get the same
boxes (gVirtualXray as triangle meshes, ctwin voxelised through a HU table that maps each HU code
to one material), the same SpekPy spectrum (1 keV bins, energy-integrating ideal detector), the
same cone-beam geometry (source 1000 mm from the isocentre, SID 1500 mm). Prints MAPE over the
pixels the body attenuates (I < 99 % of the open field) and ZNCC, at 70 and 120 kVp, between the
two, and of each against the exact image: the same spectrum and materials applied to the exact
ray-box chord lengths (slab intersection per pixel), which tells which one is off where they differ.
Only measured numbers are printed.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from launch import load_package  # noqa: E402

load_package("ctwin")

from ctwin.core import xray  # noqa: E402
from ctwin.core.carm import Geometry  # noqa: E402
from ctwin.core.projector import material_integrals  # noqa: E402
from ctwin.core.volume import Volume  # noqa: E402

HU_CODE = {"water": 0, "cortical_bone": 1500}
TABLE = {"segments": [{"hu": [-1000, -500], "materials": ["air"]},
                      {"hu": [-500, 1000], "materials": ["water"]},
                      {"hu": [1000, 3000], "materials": ["cortical_bone"], "density": "material"}]}


def step_phantom():
    """[(material, (x0, y0, z0), (x1, y1, z1))] in mm; the beam runs along +y."""
    boxes = []
    for k, t in enumerate((20, 50, 100, 150, 200)):  # water steps, row z in [10, 40)
        boxes.append(("water", (-75 + 30 * k, -t // 2, 10), (-45 + 30 * k, t - t // 2, 40)))
    for k, t in enumerate((5, 10, 20, 30, 40)):  # bone steps, row z in [-40, -10)
        boxes.append(("cortical_bone", (-75 + 30 * k, -t // 2, -40), (-45 + 30 * k, t - t // 2, -10)))
    boxes.append(("water", (-75, -50, -70), (75, 50, -50)))  # bone on water, row z in [-70, -50)
    boxes.append(("cortical_bone", (-30, 50, -70), (30, 70, -50)))
    return boxes


def voxelise(boxes, vox):
    lo = np.min([b[1] for b in boxes], axis=0) - 2
    hi = np.max([b[2] for b in boxes], axis=0) + 2
    n = np.round((hi - lo) / vox).astype(int)
    data = np.full(tuple(n), -1000, np.int16)
    for m, a, b in boxes:
        i0 = np.round((np.array(a) - lo) / vox).astype(int)
        i1 = np.round((np.array(b) - lo) / vox).astype(int)
        data[i0[0]:i1[0], i0[1]:i1[1], i0[2]:i1[2]] = HU_CODE[m]
    aff = np.diag([vox, vox, vox, 1.0])
    aff[:3, 3] = lo + vox / 2.0  # voxel i covers [lo + i vox, lo + (i + 1) vox)
    return Volume(data, aff)


def geometry(size):
    return Geometry(source_mm=[0, -1000.0, 0], detector_center_mm=[0, 500.0, 0], detector_u=[1, 0, 0],
                    detector_v=[0, 0, -1], pixel_spacing_mm=(300.0 / size, 300.0 / size), size_px=(size, size),
                    extra={"sad_mm": 1000.0})


def gvxr_images(boxes, g: Geometry, kvps):
    import trimesh
    from gvxrPython3 import gvxr

    gvxr.createOpenGLContext()
    gvxr.setSourcePosition(*g.source_mm.tolist(), "mm")
    gvxr.usePointSource()
    gvxr.setDetectorPosition(*g.detector_center_mm.tolist(), "mm")
    gvxr.setDetectorUpVector(*(-g.detector_v).tolist())  # its rows run along "up": flipped below
    gvxr.setDetectorRightVector(*g.detector_u.tolist())
    gvxr.setDetectorNumberOfPixels(g.width, g.height)
    gvxr.setDetectorPixelSize(g.pixel_spacing_mm[0], g.pixel_spacing_mm[1], "mm")
    tmp = Path(tempfile.mkdtemp())
    for i, (m, a, b) in enumerate(boxes):
        box = trimesh.creation.box(bounds=[a, b])
        p = tmp / f"box{i}.stl"
        box.export(p)
        gvxr.loadMeshFile(f"box{i}", str(p), "mm", True)  # True: add to the X-ray renderer (inner surface)
        zs, ws, rho, _ = xray.composition(m)
        gvxr.setMixture(f"box{i}", [int(z) for z in zs], [float(w) for w in ws])
        gvxr.setDensity(f"box{i}", float(rho), "g/cm3")
    out = {}
    for kvp in kvps:
        e, f = xray.spectrum(kvp)
        gvxr.resetBeamSpectrum()
        for ek, fk in zip(e, f):
            gvxr.addEnergyBinToSpectrum(float(ek), "keV", float(fk / f.sum() * 1e6))
        img = np.array(gvxr.computeXRayImage(), dtype=np.float64)[::-1]
        # open field: the spectrum's total energy per pixel in MeV (the image unit; no inverse square)
        i0 = float(sum(fk / f.sum() * 1e6 * ek / 1000.0 for ek, fk in zip(e, f)))
        print(f"  gVirtualXray {kvp} kVp: corner pixel / open field = {img[0, 0] / i0:.6f}")
        out[kvp] = img / i0
    return out


def analytic_integrals(boxes, g: Geometry) -> dict:
    """{material: density x exact chord length (g/cm3 x mm)} per pixel: ray-box slab intersection."""
    o = g.source_mm
    pix = g.pixel_centers()
    d = pix - o
    out = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        for m, a, b in boxes:
            ta = (np.asarray(a, float) - o) / d
            tb = (np.asarray(b, float) - o) / d
            t0 = np.nanmax(np.minimum(ta, tb), axis=-1)
            t1 = np.nanmin(np.maximum(ta, tb), axis=-1)
            L = np.clip(t1 - np.clip(t0, 0, None), 0, None) * np.linalg.norm(d, axis=-1)
            out[m] = out.get(m, 0.0) + L * xray.density(m)
    return out


def compare(ours, peer, interior=False):
    body = peer < 0.99
    if interior:  # drop pixels within 2 pixels of an edge (a jump of more than 2 % between neighbours)
        from scipy.ndimage import binary_dilation

        lp = np.log(np.maximum(peer, 1e-12))
        edge = np.zeros_like(body)
        edge[1:, :] |= np.abs(np.diff(lp, axis=0)) > 0.02
        edge[:, 1:] |= np.abs(np.diff(lp, axis=1)) > 0.02
        body &= ~binary_dilation(edge, iterations=2)
    mape = float(np.mean(np.abs(ours[body] - peer[body]) / peer[body]) * 100)
    a, b = ours - ours.mean(), peer - peer.mean()
    zncc = float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))
    return mape, zncc, int(body.sum())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--voxel", type=float, default=1.0)
    a = ap.parse_args()
    try:
        import gvxrPython3  # noqa: F401
    except ImportError:
        print("gVirtualXray is not installed: see this file's docstring")
        return
    boxes = step_phantom()
    g = geometry(a.size)
    kvps = (70, 120)
    peer = gvxr_images(boxes, g, kvps)
    vol = voxelise(boxes, a.voxel)
    ints = material_integrals(vol, g, xray.HuTable.from_dict(TABLE), device="auto")
    truth_ints = analytic_integrals(boxes, g)
    print(f"water/bone step phantom, {a.size}^2, voxels {a.voxel:g} mm, ideal energy-integrating detector")
    for kvp in kvps:
        setup = xray.XraySetup(kvp=kvp)
        ours = xray.form_image(ints, setup, g)["intensity"]
        truth = xray.form_image(truth_ints, setup, g)["intensity"]  # exact chords, same spectrum/materials
        flip = compare(ours[::-1], peer[kvp])
        res = compare(ours, peer[kvp])
        inner = compare(ours, peer[kvp], interior=True)
        print(f"  {kvp} kVp: ctwin vs gVirtualXray: MAPE {res[0]:.3f} % over {res[2]} body pixels, ZNCC {res[1]:.5f}; "
              f"away from edges MAPE {inner[0]:.3f} % over {inner[2]} pixels"
              f"  (same image flipped vertically: MAPE {flip[0]:.1f} %, ZNCC {flip[1]:.3f})")
        for name, img in (("ctwin", ours), ("gVirtualXray", peer[kvp])):
            r = compare(img, truth)
            print(f"    {name:12s} vs exact ray-box chords: MAPE {r[0]:.3f} %, ZNCC {r[1]:.6f}")


if __name__ == "__main__":
    main()
