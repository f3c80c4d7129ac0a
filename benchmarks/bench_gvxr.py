"""Primary polychromatic images of core.drr.xray against gVirtualXray (the validated peer) in one run.

    .venv/bin/python benchmarks/bench_gvxr.py [--size 256] [--voxel 1.0] [--skip-phantom]
        [--phantom-size 192] [--phantom-pitch 1.6] [--regions pelvis chest] [--cache /tmp/bench_gvxr]

Install the peer (optional; not needed by ctwin) and manifold3d (the phantom case's mesh union):
    pip install gvxr==2.1.0 manifold3d==3.5.4
    apt-get install libegl1 libgl1 libxcb-ewmh2 libxcb-composite0 libxcb-xinerama0 \
        libxcb-keysyms1 libxcb-icccm4 libxcb-res0
gVirtualXray runs headless with Mesa's EGL (llvmpipe, no GPU needed).

Both renderers get the same meshes, the same material per mesh, the same SpekPy spectrum (1 keV
bins, energy-integrating ideal detector) and the same cone-beam geometry (source 1000 mm from the
isocentre, SID 1500 mm). MAPE is over the pixels the body attenuates (I < 99 % of the open field);
ZNCC over the whole image. ctwin is run with both of its projectors on the voxelised meshes:
``siddon`` (exact path lengths through the voxels) and ``trilinear`` (the default; samples every
half voxel with trilinear interpolation, which spreads an edge over about a voxel).

1. Water/bone step phantom: axis-aligned boxes (faces on whole millimetres, so the voxelised copy
   at ``--voxel`` mm has no partial volume): water steps 20-200 mm thick, cortical bone (ICRP, 1.85
   g/cm3) steps 5-40 mm, and bone on 100 mm of water; ctwin voxelises them through a HU table that
   maps each HU code to one material. Each image is also compared with the exact image: the same
   spectrum and materials applied to the exact ray-box chord lengths (slab intersection per pixel
   centre), which tells which side is off where they differ.
   gVirtualXray interpolates each triangle's depth linearly in screen space; under a cone beam the
   true depth along a face seen nearly edge-on is not linear there, so a box given as 12 long
   triangles has chords off by up to ~1 cm (intensities by up to 20 %) across its side faces'
   penumbra (printed for the record).
   The meshes handed to it are therefore split to edges <= ``MAX_EDGE_MM`` (same surface).
2. The built-in phantom's meshes (``core.meshes.mesh.import_anatomy`` on the phantom CT and labels, 105
   structures and the skin; the table left out), AP views centred on the pelvis and on the chest,
   ``--phantom-size`` pixels of ``--phantom-pitch`` mm: ctwin's mesh mode
   (``core.meshes.mesh_volume.voxelise_meshes`` at ``--voxel`` mm, default per-structure HU, default
   stoichiometric HU calibration) on a crop that holds every ray of the field through the
   body; gVirtualXray with each structure as an inner surface of the material mix the calibration
   gives its HU, and the skin as the outer surface (its chord minus the inner surfaces': the
   remainder around them, as ctwin's nesting). The skin handed to both is the union of the skin
   and every inner mesh (``enclosing_skin``): the phantom's skin-tissue label pokes 3 mm out of
   its CT body surface along the back, which gVirtualXray's outer-surface rule would subtract
   elsewhere on the ray (this was the chest's earlier 2.6 / 2.3 % MAPE). The inner meshes overlap
   one another by 5 cm3 in all (of 76,600 cm3; manifold3d: sum of volumes minus their union's), so
   adding their attenuations, as gVirtualXray does, equals ctwin's nesting. Differences come from
   the voxelisation (partial volume at ``--voxel``, mixed voxels going through the calibration at
   their mean HU).
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

from ctwin.core.drr import xray
from ctwin.core.drr.carm import Geometry  # noqa: E402
from ctwin.core.drr.projector import material_integrals  # noqa: E402
from ctwin.core.meshes.mesh_volume import SKIN  # noqa: E402
from ctwin.core.volumes.volume import Volume  # noqa: E402

HU_CODE = {"water": 0, "cortical_bone": 1500}
MAX_EDGE_MM = 2.0  # longest triangle edge handed to gVirtualXray (see gvxr_add_mesh)
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


def gvxr_setup(g: Geometry, kvp=80.0):
    """A gVirtualXray context with the point source and detector of ``g`` (its image rows run along
    "up" = -v, so ``gvxr_image`` flips them back) and a beam spectrum. The spectrum must be set
    before meshes are added: with the phantom's meshes (inner surfaces and the skin as the outer
    one) added under gVirtualXray's default beam, the images for later spectra came out too bright
    by up to a factor e in the abdomen, where the skin's remainder is thickest; with a spectrum set
    first they agree with the per-mesh chords (seen with gVirtualXray 2.1.0; its cause inside
    gVirtualXray was not investigated)."""
    from gvxrPython3 import gvxr

    if not getattr(gvxr, "_bench_context", False):  # one context per process (a second one breaks it)
        gvxr.createOpenGLContext()
        gvxr._bench_context = True
    gvxr.removePolygonMeshesFromSceneGraph()
    gvxr.setSourcePosition(*g.source_mm.tolist(), "mm")
    gvxr.usePointSource()
    gvxr.setDetectorPosition(*g.detector_center_mm.tolist(), "mm")
    gvxr.setDetectorUpVector(*(-g.detector_v).tolist())
    gvxr.setDetectorRightVector(*g.detector_u.tolist())
    gvxr.setDetectorNumberOfPixels(g.width, g.height)
    gvxr.setDetectorPixelSize(g.pixel_spacing_mm[0], g.pixel_spacing_mm[1], "mm")
    set_spectrum(gvxr, kvp)
    return gvxr


def gvxr_add_mesh(gvxr, label, vertices, faces, partial: dict, outer=False, max_edge_mm=MAX_EDGE_MM):
    """Add a closed mesh (mm) of the material mix ``partial`` ({material: partial density g/cm3})
    as an inner surface (its attenuation adds) or as the outer surface (its chord minus the inner
    surfaces' chords: the remainder around them). Triangles are split to edges of at most
    ``max_edge_mm`` (the surface is unchanged): gVirtualXray interpolates the depth of a triangle
    linearly across the screen, which is exact for an orthographic view but not under a cone beam
    where a long triangle is seen nearly edge-on (a 200 mm box side, 12 triangles per box: chords
    off by up to ~1 cm, intensities by up to 20 %, in the penumbra of the step phantom); short
    triangles make that error vanish."""
    import trimesh

    v, f = np.asarray(vertices, np.float64), np.asarray(faces, np.int64)
    if max_edge_mm:
        v, f = trimesh.remesh.subdivide_to_size(v, f, max_edge_mm, max_iter=20)
    p = Path(tempfile.mkdtemp()) / f"{label}.stl"
    trimesh.Trimesh(v, f, process=False).export(p)
    gvxr.loadMeshFile(label, str(p), "mm", not outer)
    if outer:
        gvxr.addPolygonMeshAsOuterSurface(label)
    rho = float(sum(partial.values()))
    mass = {}
    for m, r in partial.items():
        zs, ws, _, _ = xray.composition(m)
        for z, w in zip(zs, ws):
            mass[int(z)] = mass.get(int(z), 0.0) + float(w) * r / rho
    gvxr.setMixture(label, list(mass), list(mass.values()))
    gvxr.setDensity(label, rho, "g/cm3")
    p.unlink()
    return len(f)


def set_spectrum(gvxr, kvp):
    """The SpekPy spectrum of ``kvp`` (1 keV bins) as gVirtualXray's beam; returns the open field
    (the spectrum's total energy per pixel in MeV, the image unit; no inverse square)."""
    e, f = xray.spectrum(kvp)
    gvxr.resetBeamSpectrum()
    for ek, fk in zip(e, f):
        gvxr.addEnergyBinToSpectrum(float(ek), "keV", float(fk / f.sum() * 1e6))
    return float(sum(fk / f.sum() * 1e6 * ek / 1000.0 for ek, fk in zip(e, f)))


def gvxr_image(gvxr, kvp):
    """gVirtualXray's image for the SpekPy spectrum of ``kvp``, over the open field."""
    i0 = set_spectrum(gvxr, kvp)
    return np.array(gvxr.computeXRayImage(), dtype=np.float64)[::-1] / i0


def gvxr_boxes(boxes, g: Geometry, kvps, max_edge_mm=MAX_EDGE_MM):
    import trimesh

    gvxr = gvxr_setup(g)
    for i, (m, a, b) in enumerate(boxes):
        box = trimesh.creation.box(bounds=[a, b])
        gvxr_add_mesh(gvxr, f"box{i}", box.vertices, box.faces, {m: xray.density(m)}, max_edge_mm=max_edge_mm)
    return {kvp: gvxr_image(gvxr, kvp) for kvp in kvps}


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


def step_case(a, kvps):
    boxes = step_phantom()
    g = geometry(a.size)
    peer = gvxr_boxes(boxes, g, kvps)
    coarse = gvxr_boxes(boxes, g, kvps, max_edge_mm=None)  # 12 triangles per box, for the record
    vol = voxelise(boxes, a.voxel)
    table = xray.HuTable.from_dict(TABLE)
    ints = {meth: material_integrals(vol, g, table, method=meth, device="auto") for meth in ("siddon", "trilinear")}
    truth_ints = analytic_integrals(boxes, g)
    print(f"water/bone step phantom, {a.size}^2, voxels {a.voxel:g} mm, ideal energy-integrating detector; "
          f"gVirtualXray meshes split to edges <= {MAX_EDGE_MM:g} mm")
    for kvp in kvps:
        setup = xray.XraySetup(kvp=kvp)
        truth = xray.form_image(truth_ints, setup, g)["intensity"]  # exact chords, same spectrum/materials
        for meth, mi in ints.items():
            ours = xray.form_image(mi, setup, g)["intensity"]
            res = compare(ours, peer[kvp])
            inner = compare(ours, peer[kvp], interior=True)
            ex = compare(ours, truth)
            print(f"  {kvp} kVp, ctwin {meth:9s} vs gVirtualXray: MAPE {res[0]:.4f} % over {res[2]} body pixels, "
                  f"ZNCC {res[1]:.6f} (away from edges MAPE {inner[0]:.4f} %); vs exact chords MAPE {ex[0]:.4f} %")
        r = compare(peer[kvp], truth)
        rc = compare(coarse[kvp], truth)
        print(f"  {kvp} kVp, gVirtualXray vs exact chords: MAPE {r[0]:.4f} %, ZNCC {r[1]:.6f}; with the boxes "
              f"as 12 triangles each: MAPE {rc[0]:.3f} %, ZNCC {rc[1]:.6f}")


def phantom_meshes(cache: Path, spacing: float):
    """The built-in phantom's anatomy as closed meshes (``core.meshes.mesh.import_anatomy`` on the phantom
    CT and labels, as ``ctwin build`` does), cached in ``cache``."""
    from ctwin.core.meshes.mesh import import_anatomy, write_ply
    from ctwin.core.meshes.mesh_volume import read_mesh_folder
    from ctwin.core.phantom.phantom import write_phantom

    md = cache / "meshes"
    if not (md / "skin.ply").is_file():
        d = cache / "phantom"
        if not (d / "seg.nii.gz").is_file():
            write_phantom(d, pose="supine_arms_down", spacing=spacing, seed=0)
        _, _, _, meshes, skin = import_anatomy(d / "ct.nii.gz", d / "seg.nii.gz")
        md.mkdir(parents=True, exist_ok=True)
        for n, m in meshes.items():
            write_ply(m, md / f"{n}.ply")
        write_ply(skin, md / "skin.ply")
    return read_mesh_folder(md)


def enclosing_skin(meshes: dict):
    """The union of the skin and every inner mesh (manifold3d), as the body surface handed to both
    renderers, and the volume it adds to the skin (mm^3).

    gVirtualXray's outer surface attenuates over its chord minus the inner surfaces' chords, which
    is the remainder around them only when every inner surface lies inside it. The phantom's skin
    (the CT body surface, ``core.meshes.mesh.skin_mesh``) and its ``skin`` label's mesh are built
    separately, and the label's mesh lies partly outside it (partial-volume skin voxels above the
    body mask's soft-tissue range, a thin mismatch spread over the surface): gVirtualXray then
    takes those chords off the remainder elsewhere on the ray while ctwin's voxelisation counts
    both. With the union as the skin both renderers describe the same body."""
    import manifold3d as mf

    from ctwin.core.meshes.mesh import Mesh

    parts = []
    for n, m in meshes.items():
        part = mf.Manifold(mf.Mesh(vert_properties=np.asarray(m.vertices, np.float32),
                                   tri_verts=np.asarray(m.faces, np.uint32)))
        if part.status() != mf.Error.NoError:
            raise SystemExit(f"mesh {n} is not a closed manifold for manifold3d: {part.status()}")
        parts.append(part)
    u = mf.Manifold.batch_boolean(parts, mf.OpType.Add).to_mesh()
    skin = Mesh(np.asarray(u.vert_properties[:, :3], np.float64), np.asarray(u.tri_verts, np.int64), name=SKIN)
    return skin, skin.volume() - meshes[SKIN].volume()


REGIONS = {"pelvis": ("hip_left", "hip_right"),  # the isocentre: the mean of these meshes' centroids
           "chest": ("lung_upper_lobe_left", "lung_upper_lobe_right", "lung_lower_lobe_left",
                     "lung_lower_lobe_right")}


def phantom_case(a, kvps, region="pelvis"):
    """AP view of the phantom's meshes centred on ``region``: ctwin's mesh mode (voxelised at
    ``--voxel`` mm, default HU table) against gVirtualXray on the same meshes, each mesh of the
    material that ctwin's HU calibration gives its HU."""
    from ctwin.core.drr.carm import named_view
    from ctwin.core.meshes.mesh_volume import hu_table, voxelise_meshes

    meshes = phantom_meshes(Path(a.cache), a.phantom_spacing)
    # the table is not anatomy and lies outside the skin: gVirtualXray's one outer surface (the skin,
    # minus every inner surface) cannot hold a second body beside it, so both renderers leave it out
    meshes.pop("table", None)
    meshes[SKIN], added = enclosing_skin(meshes)
    table = hu_table(meshes)
    centre = np.mean([meshes[n].vertices.mean(0) for n in REGIONS[region]], axis=0)
    lo_all = np.min([m.vertices.min(0) for m in meshes.values()], axis=0)
    hi_all = np.max([m.vertices.max(0) for m in meshes.values()], axis=0)
    g = named_view("ap", (lo_all, hi_all), size=a.phantom_size, pixel_spacing_mm=a.phantom_pitch, isocenter=centre)
    # the crop holds every ray of the field through the body: the field's half-width at the
    # isocentre times the largest magnification inside the body, plus a margin
    half = 0.5 * a.phantom_size * a.phantom_pitch * 1000.0 / 1500.0  # named_view: SAD 1000, SID 1500
    grow = (1000.0 + (hi_all[1] - lo_all[1])) / 1000.0
    lo = np.array([centre[0] - half * grow - 10, lo_all[1] - 2, centre[2] - half * grow - 10])
    hi = np.array([centre[0] + half * grow + 10, hi_all[1] + 2, centre[2] + half * grow + 10])
    shape = tuple(int(n) for n in np.ceil((hi - lo) / a.voxel))
    r = voxelise_meshes(meshes, table, spacing=a.voxel, box=(lo, shape))
    cal = xray.HuTable.default()
    gv = gvxr_setup(g)
    ntri = 0
    for n, m in meshes.items():
        part = {k: float(np.asarray(v).ravel()[0]) for k, v in cal.partial_densities(np.array([table[n]["hu"]])).items()
                if np.asarray(v).ravel()[0] > 0}
        # gas (-1000 HU: no material in the calibration) is still a mesh, so that the skin's
        # remainder leaves it out: air at its own density (1.2 mg/cm3; ctwin takes it as empty)
        part = part or {"air": xray.density("air")}
        # triangles of a few mm: the screen-space depth error (second order in the triangle's size)
        # is negligible, so they go as they are
        ntri += gvxr_add_mesh(gv, n, m.vertices, m.faces, part, outer=(n == SKIN), max_edge_mm=None)
    print(f"phantom meshes ({region} AP, {a.phantom_size}^2 at {a.phantom_pitch:g} mm, isocentre {np.round(centre)}): "
          f"{len(meshes)} meshes ({ntri} triangles to gVirtualXray; the skin as the union of all, "
          f"+{added / 1e3:.1f} cm3), ctwin voxelised at {a.voxel:g} mm onto "
          f"{'x'.join(map(str, shape))} in {r.seconds:.0f} s")
    peer = {kvp: gvxr_image(gv, kvp) for kvp in kvps}
    for meth in ("siddon", "trilinear"):
        mi = material_integrals(r.ct, g, cal, method=meth, device="auto")
        for kvp in kvps:
            ours = xray.form_image(mi, xray.XraySetup(kvp=kvp), g)["intensity"]
            if a.save:
                Path(a.save).mkdir(parents=True, exist_ok=True)
                np.save(Path(a.save) / f"phantom_{region}_{kvp}_{meth}_ctwin.npy", ours)
                np.save(Path(a.save) / f"phantom_{region}_{kvp}_gvxr.npy", peer[kvp])
            res = compare(ours, peer[kvp])
            inner = compare(ours, peer[kvp], interior=True)
            print(f"  {kvp} kVp, ctwin {meth:9s} vs gVirtualXray: MAPE {res[0]:.3f} % over {res[2]} body pixels, "
                  f"ZNCC {res[1]:.6f} (away from edges MAPE {inner[0]:.3f} % over {inner[2]} pixels)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--voxel", type=float, default=1.0)
    ap.add_argument("--phantom-size", type=int, default=192)
    ap.add_argument("--phantom-pitch", type=float, default=1.6, help="detector pixel pitch of the phantom view, mm")
    ap.add_argument("--phantom-spacing", type=float, default=3.0, help="phantom CT voxel size the meshes come from")
    ap.add_argument("--cache", default="/tmp/bench_gvxr", help="where the phantom and its meshes are kept")
    ap.add_argument("--skip-phantom", action="store_true")
    ap.add_argument("--skip-steps", action="store_true")
    ap.add_argument("--regions", nargs="+", default=["pelvis", "chest"], choices=sorted(REGIONS))
    ap.add_argument("--save", help="folder for the phantom images (.npy), to inspect")
    a = ap.parse_args()
    try:
        import gvxrPython3  # noqa: F401
    except ImportError:
        print("gVirtualXray is not installed: see this file's docstring")
        return
    kvps = (70, 120)
    if not a.skip_steps:
        step_case(a, kvps)
    if not a.skip_phantom:
        for region in a.regions:
            phantom_case(a, kvps, region)


if __name__ == "__main__":
    main()
