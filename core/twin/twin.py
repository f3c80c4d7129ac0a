"""The twin directory (SPEC section 4): build it from a CT and its segmentation (``build_twin``) or
from closed meshes with no CT (``build_twin_from_meshes``, mesh mode: the meshes are voxelised into
a synthetic CT by ``core.meshes.mesh_volume`` and the same pipeline follows), load it, pose it, render it.

Layout::

    twin.json        inputs, body model, fit metrics, binding table (label -> bone), versions
    fit.json         the fit's full report; fit.npz its arrays (pose, betas, transl, residual, joints)
    binding.npz      the rig (armature, rigid table, vertebra bones, soft weights)
    meshes/          <label>.ply, skin.ply, body_model.ply (world mm, acquisition pose)
    volumes/         ct.nii.gz, labelmap.nii.gz + labels.json, articulated/ (the renderer's arrays)
    twin.blend       meshes, armature, X-ray camera, DRR engine selected (written by the Blender
                     layer's finishing step, ``operators/twin_blend.py``; see ``finish`` below)

The twin's rest is its acquisition pose: the fitted pose ``p0`` and translation ``t0``. A pose file
gives a new pose ``p`` (and optionally a translation); a translation that is absent keeps ``t0``.
"""
from __future__ import annotations

import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import importlib.metadata as md

from ..errors import CtwinError
from ..fileio import read_json, write_json
from ..progress import report
from ..body.body_model import default_body_model_path, load_body_model
from ..body.fit import fit_body_model
from ..body.skeleton import JOINT_NAMES, JOINT_INDEX
from ..drr.carm import DEFAULT_SAD_MM, DEFAULT_SID_MM, default_views, named_view
from ..drr.frames import FORMATS, FrameView, render_frames
from ..drr.projector import frame_volume, prepare_volume, render_drr, resolve_device, xray_line_integral
from ..meshes.mesh import Mesh, import_anatomy, read_mesh, write_ply
from ..meshes.mesh_volume import SKIN, hu_table, load_hu_overrides, read_mesh_folder, voxelise_meshes
from ..rig.binding import bind_structures, save_binding, load_binding
from ..rig.pose import bone_deltas, bone_transforms, dqs_points, pose_meshes, check_joint_limits
from ..rig.poses import resolve_pose
from ..rig.retarget import pose_for_twin
from ..safety import (
    TWIN_OWN, twin_root_of, _PARTIAL, check_out_dir, clean_stale_partials, partial_tag,
    check_pose_values, request_keys,
)
from ..volumes.plausibility import check_ct_segmentation, check_fit
from ..volumes.volume import load_nifti, save_nifti
from .articulated import ArticulatedCT, posed_scene, prepare_articulated, render_posed
from ..drr.xray import XraySetup, parse_label_materials
from .label_materials import LabelOverrides
from ..rig.motion import load_motion
from .annotations import twin_landmarks, write_annotations

TWIN_FORMAT = 1
# Spacing of the soft tissue's inverse-warp grid. Measured on the 3 mm phantom posed to the
# walking stride (256^2 AP and lateral vs the phantom generated there): 6, 8, 10 and 12 mm give
# the same SSIM (0.9865 / 0.9767) and PSNR (36.56 / 34.11 dB) within 0.01, and 12 mm builds the
# warp 9x faster than 6 mm (3.1 s against 28 s on 2 loaded cores).
WARP_SPACING_MM = 12.0


def software_versions() -> dict:
    out = {"python": platform.python_version(), "ctwin_format": TWIN_FORMAT}
    for pkg in ("numpy", "numba", "scipy", "scikit-image", "nibabel", "SimpleITK", "trimesh", "bpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    bpy = sys.modules.get("bpy")  # Blender's version when the Blender layer is loaded; never imported here
    if bpy is not None:
        out["blender"] = bpy.app.version_string
    return out


# --------------------------------------------------------------------------------------------
# build
# --------------------------------------------------------------------------------------------
def build_twin(ct_path, seg_path, out_dir, body_model_path=None, *, finish=None,
               smooth_iterations: int = 10, force: bool = False) -> Path:
    """Build a twin directory from a CT and its segmentation. Returns the directory.

    Before any meshing, ``core.volumes.plausibility`` checks that the segmentation belongs to the CT (bone
    labels on bone, organs on soft tissue, labels inside the CT, left on the left); an implausible
    pair is refused unless ``force``, which records the problems in twin.json (``plausibility``).

    Everything is written into a temporary sibling folder that replaces ``out_dir`` only when the
    build has succeeded, so an interrupted build leaves no half-written twin.

    ``finish``: an optional last step, ``finish(build_dir)``, called with that temporary folder
    once twin.json and every core file are written and before it replaces ``out_dir``; what it
    writes there is part of the twin, and an error in it abandons the build like any other. The
    CLI passes ``operators.twin_blend.finish_build`` (twin.blend), so the core needs no Blender.
    """
    def source():
        report("build 1/6: import CT and segmentation", 0.0)
        checked = {}

        def check(ct, labelmap, names):
            checked["plausibility"] = check_ct_segmentation(ct, labelmap, names, force=force)

        ct, labelmap, names, meshes, skin = import_anatomy(ct_path, seg_path,
                                                           smooth_iterations=smooth_iterations,
                                                           check=check)
        if not meshes:
            raise CtwinError("the segmentation has no structure to build a twin from")
        inputs = {"ct": str(Path(ct_path).resolve()), "seg": str(Path(seg_path).resolve())}
        return ct, labelmap, names, meshes, skin, ct.bbox_world(), inputs, checked

    return _build(source, out_dir, body_model_path, finish)


def build_twin_from_meshes(mesh_dir, out_dir, body_model_path=None, *, hu=None, spacing: float = 3.0,
                           finish=None, subsamples: int = 4) -> Path:
    """Build a twin directory from a folder of closed per-structure meshes, with no CT (mesh mode).

    The meshes are voxelised into a synthetic CT and labelmap (``core.meshes.mesh_volume``: each
    structure's HU from the default table by kind, or ``hu``: a dict or a JSON file name -> HU or
    material), then the twin is built by the same pipeline as from a CT: fit, binding, articulated
    decomposition, meshes (the input meshes, unchanged) and ``finish`` as in ``build_twin``.
    ``twin.json`` records ``"mode": "mesh"`` and the HU table used.
    """
    def source():
        report("build 1/6: read and voxelise the meshes", 0.0)
        meshes = read_mesh_folder(mesh_dir)
        over = hu if (hu is None or isinstance(hu, dict)) else load_hu_overrides(hu)
        table = hu_table(meshes, over)
        mv = voxelise_meshes(meshes, table, spacing, subsamples=subsamples)
        skin = meshes.pop(SKIN)
        fov = (skin.vertices.min(0), skin.vertices.max(0))
        inputs = {"meshes": str(Path(mesh_dir).resolve())}
        if hu is not None and not isinstance(hu, dict):
            inputs["hu_table"] = str(Path(hu).resolve())
        extra = {"mode": "mesh",
                 "mesh_volume": {"spacing_mm": float(spacing), "subsamples": int(subsamples),
                                 "seconds": round(mv.seconds, 2),
                                 "priority": "body surface < tissue layers < organs and vessels "
                                             "< gas < bones (core.meshes.mesh_volume)"},
                 "hu_table": {n: {"hu": e["hu"], "source": e["source"],
                                  "volume_mm3": round(mv.volumes_mm3[n], 1)}
                              for n, e in sorted(table.items())}}
        return mv.ct, mv.labelmap, mv.names, meshes, skin, fov, inputs, extra

    return _build(source, out_dir, body_model_path, finish)


def _build(source, out_dir, body_model_path, finish) -> Path:
    """The build pipeline shared by both modes. ``source()`` returns (ct, labelmap, names,
    meshes, skin, fov_box, inputs, extra twin.json keys)."""
    t0 = time.perf_counter()
    out = Path(out_dir).resolve()
    check_out_dir(out, twin_ok=True)
    outer = _enclosing_twin(out)
    if outer is not None:
        raise CtwinError(f"--out {out} lies inside the twin {outer}'s own files; choose another folder")
    if out.exists() and not (out / "twin.json").exists() and any(out.iterdir()):
        raise CtwinError(f"{out} exists and is not a twin directory; choose an empty or new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_partials(out.parent)
    tmp = out.parent / f".{out.name}.{partial_tag()}partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "meshes").mkdir(parents=True)
    (tmp / "volumes").mkdir()
    try:
        ct, labelmap, names, meshes, skin, fov_box, inputs, extra = source()

        report("build 2/6: fit the body model", 0.25)
        builtin = body_model_path is None
        bm_path = default_body_model_path() if builtin else Path(body_model_path)
        bm = load_body_model(bm_path)
        fit = fit_body_model(bm, skin, labelmap, names, fov_box=fov_box)
        body = fit.body_mesh()
        fit_warnings = check_fit(fit.metrics, fit.joints_mm)

        report("build 3/6: bind structures to the armature", 0.55)
        to_bind = dict(meshes)
        to_bind["skin"] = skin
        binding = bind_structures(to_bind, bm, fit)

        report("build 4/6: decompose the CT for articulated rendering", 0.65)
        art = prepare_articulated(ct, labelmap, names, _joint_binding(binding), fit.joints_mm)

        report("build 5/6: write meshes, volumes and tables", 0.8)
        for name, mesh in meshes.items():
            write_ply(mesh, tmp / "meshes" / f"{name}.ply")
        write_ply(skin, tmp / "meshes" / "skin.ply")
        write_ply(body, tmp / "meshes" / "body_model.ply")
        fit.save_npz(tmp / "fit.npz")
        write_json(tmp / "fit.json", fit.to_json())
        save_binding(binding, tmp / "binding.npz")
        save_nifti(ct, tmp / "volumes" / "ct.nii.gz", dtype=np.int16)
        lab_dtype = np.uint8 if max(names, default=0) < 256 else np.uint16
        save_nifti(labelmap, tmp / "volumes" / "labelmap.nii.gz", dtype=lab_dtype)
        write_json(tmp / "volumes" / "labels.json", {str(k): v for k, v in sorted(names.items())})
        art.save(tmp / "volumes" / "articulated")
        fj = fit.to_json()
        meta = {
            "format": TWIN_FORMAT,
            "mode": "ct",
            "inputs": inputs,
            "ct": {"shape": list(ct.shape), "spacing_mm": ct.spacing.tolist(),
                   "bbox_mm": [b.tolist() for b in ct.bbox_world()]},
            "body_model": {"path": str(bm_path), "builtin": builtin, "num_betas": int(bm.num_betas),
                           "vertices": int(len(bm.v_template))},
            "fit": {k: fj[k] for k in ("pose", "scaffold_pose", "betas", "transl_mm", "joints_mm", "iterations", "seconds")
                    if k in fj} | {k: v for k, v in fit.metrics.items() if isinstance(v, (int, float))},
            "binding": binding.table(),
            "structures": sorted(meshes),
            "software": software_versions(),
            "build_seconds": None,
        }
        meta.update(extra)
        warnings = list(fit_warnings)
        if extra.get("plausibility", {}).get("forced"):
            warnings += [f"built with --force: {p}" for p in extra["plausibility"]["problems"]]
        meta["warnings"] = warnings
        write_json(tmp / "twin.json", meta)

        if finish is not None:
            finish(tmp)
        meta["build_seconds"] = round(time.perf_counter() - t0, 1)
        write_json(tmp / "twin.json", meta)
        if out.exists():
            kept = _foreign_entries(out, tmp)
            report(f"replacing the existing twin in {out}"
                   + (f" (keeping {len(kept)} file(s) it did not write: "
                      + ", ".join(sorted(p.name for p in kept)[:5]) + ")" if kept else ""))
            for p in kept:
                p.rename(tmp / p.name)
            old = out.parent / f".{out.name}.{partial_tag()}old"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report(f"twin written to {out} in {time.perf_counter() - t0:.1f} s", 1.0)
    return out


def _enclosing_twin(out: Path):
    """The twin directory whose own files (meshes/, volumes/ ...) contain ``out``, or None."""
    hit = twin_root_of(out.parent) if out.parent != out else None
    if hit is None:
        return None
    root, rel = hit
    parts = (rel / out.name).parts
    return root if parts and parts[0] in TWIN_OWN else None


def _foreign_entries(out: Path, new: Path) -> list:
    """Entries of an existing twin directory that the build does not write (the user's own files,
    render folders): they are moved into the new twin instead of being deleted."""
    own = set(TWIN_OWN) | {p.name for p in new.iterdir()}
    return [p for p in out.iterdir() if p.name not in own and not _PARTIAL.match(p.name)]


def _joint_binding(binding) -> dict:
    """label -> SMPL joint for the soft-tissue weights: vertebrae take their nearer spine joint."""
    out = {}
    for name, bone in binding.rigid.items():
        vb = binding.vertebrae.get(bone)
        if vb is not None:
            out[name] = JOINT_NAMES[vb.upper if vb.w >= 0.5 else vb.lower]
        else:
            out[name] = bone
    return out


# --------------------------------------------------------------------------------------------
# load and pose
# --------------------------------------------------------------------------------------------
@dataclass
class Twin:
    """A twin directory, loaded lazily."""

    path: Path
    meta: dict
    _cache: dict = field(default_factory=dict, repr=False)

    def _read(self, rel: str, loader):
        """``loader(path)`` for one of the twin's files; a missing or damaged file is one line."""
        return read_twin_file(self.path, rel, loader)

    @cached_property
    def fit(self) -> dict:
        def load(p):
            with np.load(p) as z:
                return {k: z[k] for k in z.files}

        return self._read("fit.npz", load)

    @cached_property
    def binding(self):
        return self._read("binding.npz", load_binding)

    @cached_property
    def body_model(self):
        bm = self.meta.get("body_model", {})
        if bm.get("builtin", True):
            return load_body_model(default_body_model_path())
        p = Path(bm["path"])
        if not p.exists():
            raise CtwinError(f"the twin's body model file is missing: {p}")
        return load_body_model(p)

    @cached_property
    def articulated(self):
        return self._read("volumes/articulated", ArticulatedCT.load)

    @cached_property
    def ct(self):
        return self._read("volumes/ct.nii.gz", load_nifti)

    @cached_property
    def labelmap(self):
        return self._read("volumes/labelmap.nii.gz", load_nifti)

    @cached_property
    def names(self) -> dict:
        return {int(k): v for k, v in self._read("volumes/labels.json", read_json).items()}

    @property
    def pose0(self) -> np.ndarray:
        """The rig's acquisition pose (the identity of every posing)."""
        return np.asarray(self.binding.armature.pose0, dtype=np.float64)

    @property
    def transl0_mm(self) -> np.ndarray:
        return np.asarray(self.binding.armature.transl0_mm, dtype=np.float64)

    def meshes(self, include_skin: bool = True) -> dict:
        """{name: Mesh} at the acquisition pose: label meshes (+ skin). Not the body model."""
        if "meshes" not in self._cache:
            out = {}
            for name in [*self.meta.get("structures", []), "skin"]:
                out[name] = self._read(f"meshes/{name}.ply", lambda p, n=name: read_mesh(p, name=n))
            self._cache["meshes"] = out
        m = dict(self._cache["meshes"])
        if not include_skin:
            m.pop("skin", None)
        return m

    def skeleton_rest_mm(self) -> np.ndarray:
        """The rest skeleton (24, 3) mm that the twin's pose vectors are read on: its body model's
        mean-shape joints (the fit's scaffold pose is solved on their bone directions)."""
        if "skeleton_rest" not in self._cache:
            self._cache["skeleton_rest"] = np.asarray(self.body_model.rest()[1], dtype=np.float64) * 1000.0
        return self._cache["skeleton_rest"]

    def located_joints(self):
        """Indices of the joints whose centres the fit located from the labels (``fit.json``'s
        ``joint_sources``), or None when the twin does not record them."""
        if "located" not in self._cache:
            loc = None
            fj = self.path / "fit.json"
            if fj.is_file():
                src = read_json(fj).get("joint_sources")
                if src:
                    loc = sorted(JOINT_INDEX[n] for n in src if n in JOINT_INDEX)
            self._cache["located"] = loc
        return self._cache["located"]

    def source_acquisition(self):
        """The acquisition pose on its own skeleton, when the input CT has a pose file beside it that
        names one (``truth.json`` with ``rest_joints``, as a phantom writes): a resolved pose dict, or
        None. Poses on that skeleton are then mapped relative to the acquisition."""
        if "source_acq" not in self._cache:
            acq = None
            ct = self.meta.get("inputs", {}).get("ct")
            if ct:
                p = (Path(ct) if Path(ct).is_dir() else Path(ct).parent) / "truth.json"
                if p.is_file():
                    try:
                        r = resolve_pose(str(p))
                    except CtwinError:
                        r = {}
                    acq = r if r.get("rest_joints") is not None and r.get("pose") is not None else None
            self._cache["source_acq"] = acq
        return self._cache["source_acq"]

    def resolve_pose(self, name_or_path) -> tuple:
        """A preset, pose file or mapping as ``(pose (72,), transl_mm or None)`` on this twin: retargeted
        from the file's source skeleton, solved from world joints, or applied as a change from the
        acquisition pose (``core.rig.retarget.pose_for_twin``)."""
        raw = resolve_pose(name_or_path)
        if raw["pose"] is not None:
            check_pose_values(raw["pose"], raw.get("transl"), what=f"pose {name_or_path}")
        p, t = pose_for_twin(raw, self.binding.armature, self.skeleton_rest_mm,
                             acquisition=self.source_acquisition, located=self.located_joints)
        return np.asarray(p, dtype=np.float64), t

    def joint_deltas(self, pose, transl_mm=None) -> np.ndarray:
        """D_j (24, 4, 4): acquisition world mm -> posed world mm."""
        return self.binding.armature.deltas(pose, transl_mm)

    def bone_deltas(self, pose, transl_mm=None) -> dict:
        return bone_deltas(self.binding, pose, transl_mm)

    def bone_transforms(self, pose, transl_mm=None) -> dict:
        """{skeletal structure: 4x4} acquisition -> posed (rigid)."""
        return bone_transforms(self.binding, pose, transl_mm)

    def posed_meshes(self, pose, transl_mm=None) -> dict:
        return pose_meshes(self.binding, self.meshes(), pose, transl_mm)

    def posed_body(self, pose, transl_mm=None):
        """The fitted body-model surface at a pose: the surface as fitted at the acquisition, moved by
        the armature's joint deltas with the body model's skinning weights (the same deltas that
        move the bones, so the skin and the skeleton stay together), blended as dual quaternions
        (no flesh collapsing into bent joints)."""
        bm = self.body_model
        if "body_acq" not in self._cache:
            fit = self.fit
            p0 = fit["pose"]
            v, _ = bm.forward(pose=p0, betas=fit["betas"], transl_mm=fit["transl_mm"], residual_mm=fit["residual_mm"])
            w = np.asarray(bm.weights, dtype=np.float64)
            idx = np.broadcast_to(np.arange(w.shape[1]), w.shape)
            self._cache["body_acq"] = (np.asarray(v, dtype=np.float64), idx, w)
        v, idx, ww = self._cache["body_acq"]
        d = self.joint_deltas(pose, transl_mm)
        return Mesh(dqs_points(d, v, idx, ww), np.asarray(bm.faces, dtype=np.int64), "body_model")

    def posed_scene(self, pose=None, transl_mm=None, device: str = "cpu"):
        """The articulated CT posed for rendering (a ``core.drr.projector.Scene``); ``device`` "cuda"
        poses on the GPU (``core.twin.articulated.posed_scene``)."""
        if pose is None:
            pose = self.pose0
        jd = self.joint_deltas(pose, transl_mm)  # once: the bones' deltas derive from the same
        return posed_scene(self.articulated, bone_deltas(self.binding, pose, transl_mm, jd), jd,
                           warp_spacing_mm=WARP_SPACING_MM, device=device)

    def render(self, geometry, pose=None, transl_mm=None, *, step_mm=None, device="auto") -> np.ndarray:
        """Line-integral DRR of the twin at a pose through the articulated path (identity = p0)."""
        dev = resolve_device(device)
        return render_posed(self.posed_scene(pose, transl_mm, dev), geometry, step_mm=step_mm, device=dev)

    @property
    def ct_bbox_mm(self) -> tuple[np.ndarray, np.ndarray]:
        """World (min, max) of the CT's cell box, mm (recorded in twin.json at build)."""
        lo, hi = self.meta["ct"]["bbox_mm"]
        return np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)

    def default_views(self, size=512, **kw) -> dict:
        """SPEC section 5 metric views (AP and lateral) for this twin's CT bounding box."""
        return default_views(self.ct_bbox_mm, size=size, **kw)


# The files every command that loads a twin reads; load_twin refuses a twin that lacks one. The
# volumes are checked where they are read (``Twin._read``): posing meshes does not need them.
REQUIRED_FILES = ("fit.npz", "binding.npz", "meshes/skin.ply", "meshes/body_model.ply")


def read_twin_file(twin_dir, rel: str, loader):
    """``loader(twin_dir / rel)``; a missing, truncated or unreadable file raises one line that names
    it and says to rebuild (a ``CtwinError`` from the loader passes through)."""
    p = Path(twin_dir) / rel
    if not p.exists():
        raise CtwinError(f"the twin {Path(twin_dir)} is damaged: {rel} is missing; rebuild it with 'ctwin build'")
    try:
        return loader(p)
    except CtwinError as exc:
        raise CtwinError(f"the twin {Path(twin_dir)} is damaged: {rel}: {exc}; rebuild it with 'ctwin build'") from None
    except PermissionError:
        raise CtwinError(f"cannot read the twin's {rel} in {Path(twin_dir)}: permission denied") from None
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to read a twin file means a damaged twin
        raise CtwinError(f"the twin {Path(twin_dir)} is damaged: {rel} cannot be read "
                         f"({type(exc).__name__}: {' '.join(str(exc).split())[:80]}); "
                         f"rebuild it with 'ctwin build'") from None


def load_twin(path) -> Twin:
    p = Path(path)
    if not p.is_dir():
        raise CtwinError(f"twin directory not found: {p}")
    if not (p / "twin.json").is_file():
        raise CtwinError(f"{p} is not a twin directory (no twin.json); build one with 'ctwin build'")
    meta = read_twin_file(p, "twin.json", read_json)
    if not isinstance(meta, dict):
        raise CtwinError(f"the twin {p} is damaged: twin.json is not an object; rebuild it with 'ctwin build'")
    for rel in REQUIRED_FILES:
        if not (p / rel).is_file():
            raise CtwinError(f"the twin {p} is damaged: {rel} is missing; rebuild it with 'ctwin build'")
    if meta.get("format") != TWIN_FORMAT:
        raise CtwinError(f"{p}: twin format {meta.get('format')} is not supported (expected {TWIN_FORMAT})")
    return Twin(p.resolve(), meta)


# --------------------------------------------------------------------------------------------
# rendering frames
# --------------------------------------------------------------------------------------------
def frame_poses(twin: Twin, pose=None, motion=None, frames=None, fps: float = 24.0, source_model=None):
    """[(frame, pose (72,), transl_mm or None)] for a render: the acquisition pose, a pose file, or a
    motion file resampled to ``fps``. ``frames`` = (A, B) with B exclusive. ``source_model``: the SMPL
    or SMPL+H file a motion was made on (its betas shape it; ``core.rig.motion.load_motion``)."""
    if motion is not None and pose is not None:
        raise CtwinError("give --pose or --motion, not both (a motion sets every frame's pose)")
    if motion is not None:
        src = None if source_model is None else (source_model, twin.skeleton_rest_mm(), twin.located_joints())
        poses, transl = load_motion(motion, fps=fps, twin_pose=twin.pose0, twin_transl_mm=twin.transl0_mm,
                                    source=src)[:2]
        n = len(poses)
        a, b = (0, n) if frames is None else frames
        if b > n:
            raise CtwinError(f"the motion has {n} frames at {fps:g} fps; --frames {a}:{b} is beyond it")
        check_pose_values(poses[a:b], transl[a:b], what=f"motion {Path(motion).name}")
        return [(f, poses[f], transl[f]) for f in range(a, b)]
    if pose is not None:
        p, t = twin.resolve_pose(pose)

        check_joint_limits(p, label=f"pose {pose}")
    else:
        p, t = twin.pose0, None
    a, b = (0, 1) if frames is None else frames
    return [(f, p, t) for f in range(a, b)]


def render_twin(twin_dir, out_dir, *, pose=None, motion=None, frames=None, view=None, geometry=None,
                size=None, device="auto", sad_mm=DEFAULT_SAD_MM, sid_mm=DEFAULT_SID_MM, parallel=False,
                method="trilinear", step_mm=None, value="line_integral", kvp=None, photons=None,
                electronic_sigma=0.0, seed=0, fps: float = 24.0, annotate: bool = False,
                views: dict | None = None, xray=None, fmt: str = "tiff", source_model=None,
                overwrite: bool = False, label_materials=None, samples_per_ray: int | None = None,
                storage: str = "auto") -> int:
    """Render a twin's frames (posed by a pose file or a motion) as <view>_<frame>.tif + .json.

    ``annotate`` also writes, per frame and view, the projected label masks and the 2D joints and
    landmarks (``core.twin.annotations``). ``views`` ({name: Geometry, or a callable frame -> Geometry})
    overrides the named views, e.g. for a C-arm sweep. ``xray`` (a ``core.drr.xray.XraySetup``; ``kvp``
    makes one with default options) renders with the realistic physics chain instead of SPEC 5 mu.
    ``fmt`` "dicom" writes each frame as a DICOM DX file (``core.drr.dicom_dx``) instead of a TIFF.
    A frame already in ``out_dir`` is kept only when it reads back whole and its sidecar matches
    this request (``core.safety``); one written for another request is refused unless ``overwrite``.
    ``label_materials`` (with ``xray``; "LABEL=MATERIAL" strings or a dict, ``auto`` for the defaults
    alone): the twin's labels take these materials, moving with their bone or tissue
    (``core.twin.label_materials``). ``samples_per_ray`` and ``storage`` ("float16") as in
    ``core.drr.projector.render_drr`` and ``prepare_volume``, applied to each composed frame.
    """
    if fmt not in FORMATS:
        raise CtwinError(f"unknown frame format {fmt!r}; use tiff or dicom")
    if xray is None and kvp is not None:
        xray = XraySetup(kvp=kvp, photons=photons, seed=seed,
                         electronic_sigma=electronic_sigma if photons is not None else None)
    if method != "trilinear":
        raise CtwinError("twins render with the trilinear method (posed sub-volumes); drop --method siddon")
    twin = load_twin(twin_dir)
    dev = resolve_device(device)
    out = Path(out_dir)
    overrides = None
    if label_materials is not None:
        if xray is None:
            raise CtwinError("label materials need the realistic physics (--kvp)")
        mapping = label_materials if isinstance(label_materials, dict) else parse_label_materials(label_materials)
        overrides = LabelOverrides(twin.articulated, twin.labelmap, twin.names, mapping)
        if not overrides.applied:
            raise CtwinError("no label of the twin takes a material (no --label-material entry, and no label "
                             "named as an implant); give --label-material LABEL=MATERIAL")
        xray.overrides, xray.label_materials = list(overrides.materials), dict(overrides.applied)
    if storage != "auto" and xray is not None:
        raise CtwinError("float16 storage holds SPEC 5 mu; the realistic physics (--kvp) needs the HU volume")
    if views is None and geometry is not None:
        views = {"view": geometry.with_sad(geometry.sad_mm)}  # records the SAD its physics uses
    elif views is None:
        names = [view] if view else ["ap", "lateral"]
        views = {n: named_view(n, twin.ct_bbox_mm, sad_mm=sad_mm, sid_mm=sid_mm, size=size or 512,
                               parallel=parallel) for n in names}
    todo = frame_poses(twin, pose, motion, frames, fps, source_model=source_model)
    poses = {f: (p, t) for f, p, t in todo}

    def expected(i, g, f, p, t):
        if xray is not None:
            xray.seed, xray.stream = seed + f, i
        keys = request_keys(step_mm, photons, electronic_sigma, seed + f, xray)
        return g.to_sidecar(frame=f, value=value, device=dev, source=str(twin.path),
                            method=method, pose=np.asarray(p).tolist(),
                            transl_mm=None if t is None else np.asarray(t).tolist(),
                            samples_per_ray=samples_per_ray, storage=storage, **keys)

    def frame_views(f, p, t):
        out_views = []
        for i, (n, g) in enumerate(views.items()):
            g = g(f) if callable(g) else g
            out_views.append(FrameView(n, out / f"{n}_{f:04d}", g, expected(i, g, f, p, t)))
        return out_views

    def prepare(f):
        p, t = poses[f]
        state = {"scene": twin.posed_scene(p, t, dev)}
        if annotate:
            posed = twin.posed_meshes(p, t)
            posed.pop("skin", None)
            state["annotations"] = (posed, twin.binding.armature.posed_joints(p, t), twin_landmarks(twin, p, t))
        return state

    def render(f, v, state, record):
        if annotate:
            write_annotations(v.stem, v.geometry, *state["annotations"])
        if xray is not None:
            if overrides is None:
                vol = frame_volume(state["scene"])
            elif "volume" in state:
                vol = state["volume"]
            else:  # the frame with the override codes, once per frame
                vol = state["volume"] = overrides.frame(state["scene"])
            return xray_line_integral(vol, v.geometry, xray, step_mm=step_mm, device=dev, record=record,
                                      samples_per_ray=samples_per_ray)
        if samples_per_ray is not None or storage != "auto":
            if "volume" not in state:
                state["volume"] = prepare_volume(frame_volume(state["scene"]), storage=storage)
            return render_drr(state["volume"], v.geometry, step_mm=step_mm, device=dev,
                              samples_per_ray=samples_per_ray)
        return render_posed(state["scene"], v.geometry, step_mm=step_mm, device=dev)

    render_frames([(f, frame_views(f, p, t)) for f, p, t in todo], render, value=value, photons=photons,
                  electronic_sigma=electronic_sigma, seed=seed, xray=xray, overwrite=overwrite, fmt=fmt,
                  prepare=prepare)
    return 0
