"""Articulated 2D/3D registration: the twin's pose (72 values + translation) from X-ray images.

Method (no GPU needed; numpy, scipy and numba):

- **Bone clouds.** Every bone of the twin's articulated CT (``core.twin.articulated``: one rigid
  sub-volume per skeletal label) becomes a cloud of points at its voxel centres, each weighted by
  the bone's attenuation in excess of water, ``mu(HU) - mu(0) = 0.02/mm x HU/1000`` (SPEC 5
  monoenergetic model) times the voxel volume. Voxels below ``BONE_HU`` are left out, so the
  clouds hold bone and not the rim of soft tissue around it. Clouds of fine CTs are pooled to
  about ``CLOUD_SPACING_MM``.
- **Soft tissue and table.** The twin's soft tissue (the articulated CT's bone-filled soft volume)
  pooled to ``SOFT_SPACING_MM`` blocks of full attenuation, each block moved rigidly with the joint
  of its largest skinning weight (``bone_cloud(soft_blend=True)``: by the linear blend of its
  joints' transforms, as the renderer's warp moves the soft tissue; ``soft_uniform=True``: water
  wherever the body is; both measured worse on the benchmark), and the static part (table) in
  place: the moving image then has the body outline and the table edges that the X-ray has
  (without them the rigid fit was drawn to those edges).
- **DRRs by splatting.** A pose gives each structure its rigid 4x4 (``core.rig.pose``); each
  point is moved (a soft-tissue block by its blend), projected with the view's 3x4 matrix and
  splatted bilinearly with the density factor of a cone beam (``sid^2 |X - S| / (pixel area x
  depth^3)``), so the image is the line integral of the bones' excess attenuation (plus the soft
  tissue's and the table's). No soft-tissue warp while optimising: a pose costs a few milliseconds
  per view.
- **Similarity.** Gradient correlation (Penney et al., IEEE TMI 17(4):586-595, 1998): the mean of
  the normalised cross-correlations of the row and column gradients of the Gaussian-smoothed
  images, summed over the views. It ignores the offset and scale of the intensities, so the soft
  tissue, beam hardening and detector response of a real image matter little; the input is
  turned into line integrals first (``-log`` of an intensity, the inverse of the log display).
- **Optimisation.** Coarse to fine over the image size (64, 128, 256 px by default; the clouds
  pooled to half a pixel at each level). At the coarsest level: the root (rotation + translation,
  several starts), whose ``ROOT_HYPOTHESES`` best distinct optima each go through the rest of the
  coarsest level, the best-scoring result kept; each limb chain (hip + knee; collar + shoulder +
  elbow) on a joint grid of its big rotations (``CHAIN_GRIDS``: a proximal joint's best angle
  depends on the distal one's, which one joint at a time misses), the best cells refined; the distal groups (ankles and feet, wrists
  and hands, neck and head) searched over single-axis offsets of +-15..90 degrees; the root with
  both legs refined together; the chain grids again (each limb now scored with the other limbs
  placed); the left and right limbs' poses tried exchanged (mirrored; a lateral view superimposes
  the sides) and refined with the root, the better kept; the root; then at every level the root
  with the spine, then the limb groups from proximal to distal. After the coarsest level (on the
  best hypothesis) and before the second level's stages, a global search (``Evolve``: seeded
  differential evolution within +-45 / 30 degrees of the pose so far, its best member refined)
  of each arm chain (collar + shoulder + elbow, the humerus twist included) and, at the coarsest
  level, of the root with the spine and neck (``EVOLVE_LEVELS``, ``EVOLVE_GROUPS``; with two or more
  views only). While one group moves, the structures it cannot move are splatted once and kept. Powell's method (scipy) with the anatomical joint ranges of ``core.rig.pose.JOINT_LIMITS_DEG``
  as bounds (by projection, with a quadratic penalty outside), a Gaussian prior that pulls each
  joint toward the start pose (wide along the main flexions, tight on the off-axis rotations of the
  knee and elbow hinges: ``PRIOR_AXIS_SIGMA_DEG``; weight ``PRIOR_WEIGHT``, or
  ``PRIOR_WEIGHT_ONE_VIEW`` for a single view),
  and the root kept within ``ROOT_RANGE_DEG`` / ``ROOT_RANGE_MM`` of its start. With a single
  view each limb chain is also refined from its pose mirrored in depth through the image plane
  (``DEPTH_MIRROR_LEVELS``, ``_Problem.mirror_depth``), the better kept.
- **Rigid baseline** (``articulated=False``): the whole twin as one rigid body (the root only).
- **C-arm refinement** (``refine_geometry=True``): after the root, each view after the first gets
  a rigid correction of its geometry relative to the patient (6 values) before the joints move.

Input images: TIFF + geometry sidecar (SPEC 4, as ``ctwin render`` writes, ``value`` line_integral,
intensity or display), or DICOM (pydicom) with a sidecar beside it or with the projection tags
(source-detector and source-patient distances, imager pixel spacing, positioner angles); a DICOM
radiograph does not tie the isocentre to the CT, so it is taken at the centre of the twin's CT box.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.ndimage import binary_erosion, correlate1d, gaussian_filter, gaussian_filter1d, map_coordinates
from scipy.optimize import minimize

from ..drr.carm import Geometry, named_view
from ..errors import CtwinError
from ..progress import report
from ..body.skeleton import (JOINT_INDEX, JOINT_NAMES, N_JOINTS, PARENTS, ForwardKinematics, rodrigues,
                             rotation_to_rotvec, rotvec_fast as _rotvec)
from ..drr.physics import COUNT_FLOOR, DISPLAY_MAX
from ..fileio import atomic_path, read_json, write_json
from ..rig.pose import JOINT_LIMITS_DEG, vertebra_transforms
from ..volumes.volume import apply_transform
from ..drr.projector import PlacedVolume
from ..rig.pose import bone_deltas
from .articulated import ArticulatedCT, posed_scene, render_posed
# Imported where used, so that importing this module stays light: PIL, numba (heavy or optional third-party packages).

MU_WATER_PER_MM = 0.02  # SPEC 5 monoenergetic model
BONE_HU = 150.0  # voxels above this count as bone in the clouds (cancellous bone is ~200-400 HU)
CLOUD_SPACING_MM = 2.0  # clouds of finer CTs are pooled to about this spacing
SOFT_SPACING_MM = 9.0  # soft tissue cloud: its outline only needs to match at the coarse levels
# bone_cloud(soft_uniform=True): the soft tissue as water wherever the body is, above this HU (lung,
# -700 to -900 HU, counts as body; air and bowel gas, -1000 HU, do not), without the inner contrast
# (lungs, organs) that blocks moved with the joints do not deform as the body does
SOFT_BODY_HU = -900.0
# the soft-tissue image smoothed with a Gaussian of this fraction of the block size (0: not). A
# lattice of point splats of spacing a, blurred with sigma, keeps a ripple of
# exp(-2 pi^2 sigma^2 / a^2) (the Fourier series of a Gaussian-smoothed comb): 0.7 % at sigma = a / 2.
# 0.5 measured on the benchmark (README, "Pose from X-ray"): no better, so off
SOFT_BLUR = 0.0
# a soft-tissue block blends the transforms of up to this many joints (its largest skinning weights):
# with 8, the blocks land where the renderer's skinning (all weights) puts them, to 1e-12 mm on the
# 3 mm phantom's twin; with 4, 1 % of them were more than 8 mm off at a hip flexed 60 degrees
MIX_JOINTS = 8
LEVELS = (64, 128, 256)
# joint groups in hierarchical order (after the root): each moves with everything above it fixed
GROUPS = (
    ("spine", ("spine1", "spine2", "spine3")),
    ("neck", ("neck", "head")),
    ("left_hip", ("left_hip",)), ("right_hip", ("right_hip",)),
    ("left_shoulder", ("left_collar", "left_shoulder")), ("right_shoulder", ("right_collar", "right_shoulder")),
    ("left_knee", ("left_knee",)), ("right_knee", ("right_knee",)),
    ("left_elbow", ("left_elbow",)), ("right_elbow", ("right_elbow",)),
    ("left_ankle", ("left_ankle", "left_foot")), ("right_ankle", ("right_ankle", "right_foot")),
    ("left_wrist", ("left_wrist", "left_hand")), ("right_wrist", ("right_wrist", "right_hand")),
)
# the root's search range around the start (registration is specified for starts within 50 mm and 10 degrees)
ROOT_RANGE_DEG, ROOT_RANGE_MM = 20.0, 100.0
# single-axis offsets tried before a limb group's first optimisation (its optimum is narrow:
# about +-10 degrees at 64 px)
SEARCH_DEG = (-90, -75, -60, -45, -30, -15, 15, 30, 45, 60, 75, 90)
# limb chains searched jointly on a grid at the coarsest level: a proximal joint's best angle
# depends on the distal one (a flexed knee moves the tibia away from where a straight leg puts it),
# so one joint at a time is caught by the distal bone's overlap. Per chain: (joint, axis, offsets
# in degrees from the stage's start; "side" offsets are mirrored for the right side). The grid
# spans the anatomical ranges of the big movements (hip flexion to 105 deg, knee to 150 deg,
# shoulder abduction to 165 deg and flexion to 90 deg); the optimiser refines from the best cells.
CHAIN_GRIDS = {  # offsets from the start pose
    "leg": ((("hip", 0, tuple(range(-105, 31, 15))), ("hip", 1, (-30, 0, 30)), ("hip", 2, (-20, 0, 20)),
             ("knee", 0, tuple(range(0, 151, 15)))), ("hip", "knee")),
    "arm": ((("shoulder", 2, tuple(range(-45, 166, 15))), ("shoulder", 1, (-90, -60, -30, 0, 30, 60)),
             ("shoulder", 0, (-30, 0, 30)), ("elbow", 1, (-90, -45, 0))), ("collar", "shoulder", "elbow")),
}
CHAIN_KEEP = 4  # grid cells refined by the optimiser
# limbs whose left and right poses are tried exchanged after the grids (a lateral view superimposes
# the two sides)
SWAP_GROUPS = (("hip", "knee", "ankle", "foot"), ("collar", "shoulder", "elbow", "wrist", "hand"))
_DEBUG = False
BOTH_ORDERS = False  # also try the limbs before the root at the coarsest level, keep the better
JOINT_REFINE = True  # after the limb grids, the root and both legs refined together
# distinct root optima of the coarsest rigid fit each carried through the coarsest level's limb
# search, the best kept (with the limbs at the start pose, a wrong root can outscore the right one)
ROOT_HYPOTHESES = 3
ROOT_DISTINCT = (5.0, 15.0)  # degrees, mm: root optima closer than both are one hypothesis
# the global search (``Evolve``) of each arm chain (collar + shoulder + elbow, the humerus twist
# included) and of the trunk (root, spine and neck), run at these levels (indices into ``levels``)
# from the level's pose so far: (group, span in degrees per joint axis, evaluations). Measured on
# the reduced benchmark with the weaker prior below (README, "Pose from X-ray"): mean of the
# means 7.4 -> 6.9 mm, 3 -> 4 of 7 converged (AP + lateral); the weaker prior alone: 7.6 mm. From
# AP alone the pair is worse (25.9 -> 35.2 mm: one flexed hip swung to the wrong side of the beam)
EVOLVE_LEVELS = (0, 1)
_ARM, _TRUNK = ("collar", "shoulder", "elbow"), ("spine1", "spine2", "spine3", "neck")
_LEG, _FOREARM = ("hip", "knee", "ankle"), ("elbow", "wrist", "hand")
# groups searched per side (the joint names without "left_" / "right_"); the others are global.
# Legs at 64 px and forearms at 128 px added to the default's searches changed no target of the
# reduced benchmark by more than 0.4 mm (mean of the means 6.86 mm both): not in EVOLVE_GROUPS
_SIDED = ("arm", "leg", "forearm")
EVOLVE_GROUPS = {  # per level index: (group, its joints, span in degrees, evaluations)
    0: (("arm", _ARM, 45.0, 2000), ("trunk", _TRUNK, 12.0, 2000)),
    1: (("arm", _ARM, 30.0, 1000),),  # 4 times the pixels: the arms only, fewer evaluations
}
# the similarity: "gc", the gradient correlation of the whole views (Penney et al. 1998), or
# "gc_tiles", its mean over TILES x TILES tiles (``_TiledLevel``). gc_tiles prefers the truth to the
# default's estimate on 5 of the reduced benchmark's 7 targets at 256 px (gc on 3), but registering
# with it at 128 and 256 px was worse (mean of the means 6.86 -> 7.22 mm, 4 -> 3 of 7 converged) and
# at all levels derailed a random pose (README, "Registration accuracy")
SIMILARITY = "gc"
TILES = 8
TILED_LEVELS = (0, 1, 2)  # the level indices gc_tiles scores (the others: gc)
TILE_MIN_ENERGY = 0.01  # tiles with less target gradient energy than this x the mean tile's are left out
# With a single view each limb chain's depth is ambiguous: a limb rotated toward the source and one
# rotated away by as much project alike but for the perspective magnification. One view therefore
# tries each chain (``CHAIN_GRIDS``) mirrored through the plane through its top joint perpendicular
# to the ray there (``_depth_mirrored``), refined and kept when it scores better, at these levels
# (indices into ``levels``; negative counts from the finest). Measured with the one-view prior
# below (AP only, 7 targets): sitting's left hip, 145 degrees off on the wrong side of the beam
# without them, within 2 degrees with them (119.7 -> 16.3 mm); mean of the means 34.5 -> 19.4 mm
DEPTH_MIRROR_LEVELS = (0, -1)
ROT_UNIT = 0.1  # optimiser units: 0.1 rad (5.7 deg) ...
TRANS_UNIT = 10.0  # ... and 10 mm
PRIOR_SIGMA_DEG = 40.0  # Gaussian prior on each joint's change from the start pose ...
# ... in units of the summed gradient correlation (one view: at most 1). At 0.02 the truth's
# distance from the start cost more than its similarity gains on two of the benchmark's random
# poses (random_1: +0.028 of prior against +0.001 / +0.005 / +0.011 of similarity at 64 / 128 /
# 256 px; benchmarks/results/diag_register_search.txt)
PRIOR_WEIGHT = 0.005
# With a single view the weaker prior alone let a flexed hip swing to the wrong side of the beam
# (AP only, sitting: 19.3 -> 119.7 mm); with the depth hypotheses (``DEPTH_MIRROR_LEVELS``) it
# is the better one-view prior: mean of the 7 targets' means 25.9 (0.02) -> 19.4 mm (README, "One
# view: the limbs' depth"; benchmarks/results/bench_register_depth_ap.txt). No global search with
# one view (``EVOLVE_LEVELS``)
PRIOR_WEIGHT_ONE_VIEW = 0.005
# per joint and axis (rotation vector x, y, z) where the prior differs: wide along the main
# movements (hip, knee and elbow flexion, shoulder abduction and flexion: a 90 degree
# flexion costs 0.003, less than a right limb gains; at 40 degrees a flexed limb stayed straight),
# tight on the off-axis rotations of the knee and elbow hinges (knee varus-valgus laxity 2-5 deg:
# Markolf et al., J Bone Joint Surg Am 58(5):583-594, 1976)
PRIOR_AXIS_SIGMA_DEG = {
    "left_hip": (120.0, None, None), "right_hip": (120.0, None, None),
    "left_knee": (120.0, 8.0, 8.0), "right_knee": (120.0, 8.0, 8.0),
    "left_shoulder": (None, 120.0, 120.0), "right_shoulder": (None, 120.0, 120.0),
    "left_elbow": (8.0, 120.0, 8.0), "right_elbow": (8.0, 120.0, 8.0),
}
# The final refinement scored with the twin's real posed DRR (``posed_refine``): the soft tissue
# through the renderer's inverse skinning warp and the bones rigid (``core.twin.articulated``), instead
# of the splatted clouds whose rigid soft-tissue blocks fit a deformed outline less well. The posed
# DRR ranks the truth above the default's estimate on 5-6 of the reduced benchmark's 7 targets at
# 128 and 256 px (the splatted clouds: 3); this local refinement from the estimate, with the settings
# below, took the mean of the 7 targets' means from 6.86 to 6.38 mm (random_2 9.0 -> 6.8 mm,
# random_1 13.4 -> 12.3 mm, arm_abducted 1.6 -> 2.5 mm) but the same 4 of 7 converged, so it is off
# by default (README, "The final pose scored with the posed DRR"; benchmarks/results/bench_register_posed.txt)
POSED_REFINE = False
# px: the level whose views and targets it scores (the one nearest this size). At 128 px a move of
# random_0's right arm that the posed DRR scores higher at 64 and 128 px but lower at 256 px took
# it from 11.7 to 17.1 mm; at 256 px the ranking is the best measured
POSED_SIZE = 256
# the articulated CT pooled f x f x f for it (``coarse_articulated``); None: to its weight grid's
# cells (3 x 3 x 3 voxels, 9 mm, for a 3 mm CT's twin: 2.5 times cheaper, and it keeps the posed
# DRR's ranking of truth and estimate on 5 of the 7 targets at 256 px, README)
POSED_COARSEN = None
POSED_WARP_MM = 18.0  # the inverse warp's node spacing for it (the twin's own: 12 mm)
POSED_MAXFEV = 800  # posed DRR evaluations (about 0.13 s each on the idle 2-core CPU at 256 px)
POSED_STEP_DEG, POSED_STEP_MM = 4.0, 4.0  # the compass search's first step (halved to an eighth)
# the joints it moves (the root: rotation and translation); an axis whose prior is tight
# (``PRIOR_AXIS_SIGMA_DEG`` <= 10 degrees: the hinges' off-axis rotations) is left where it is
POSED_JOINTS = ("pelvis", "spine1", "spine2", "spine3", "neck", "left_shoulder", "right_shoulder",
                "left_elbow", "right_elbow", "left_hip", "right_hip", "left_knee", "right_knee")
# joints also moved with their children's world orientations kept (the children counter-rotated):
# a trunk bend whose error the arms compensate is otherwise reachable only by moving both at once.
# Without them (300 evaluations) the refinement moved no target by more than 0.8 mm
POSED_DECOUPLED = ("spine1", "spine2", "spine3")


# --------------------------------------------------------------------------------------------
# input images
# --------------------------------------------------------------------------------------------
@dataclass
class XRay:
    """One input image as line integrals, with its geometry."""

    name: str
    image: np.ndarray  # float64 (H, W) line integrals
    geometry: Geometry
    value: str = "line_integral"
    path: str = ""
    sidecar: dict = field(default_factory=dict)
    photons: float | None = None  # unattenuated photons per pixel of a noisy image, where known


def line_integral_ceiling(photons: float) -> float:
    """The largest line integral a noisy image of ``photons`` unattenuated photons per pixel can
    measure: half a count (``COUNT_FLOOR``, the floor of ``core.drr.physics.add_noise``). Beyond it a pixel counted
    (almost) nothing; a realistic chain (energy-weighted counts, electronic noise) gives such pixels
    line integrals far above it, whose gradients would dominate the correlation."""
    return float(-math.log(COUNT_FLOOR / float(photons)))


def to_line_integral(image, value: str) -> np.ndarray:
    """Invert the output value of a DRR or radiograph to line integrals (SPEC 5 values)."""
    img = np.asarray(image, dtype=np.float64)
    if value == "line_integral":
        return img
    if value == "intensity":
        top = float(np.nanpercentile(img, 99.9))
        scale = top if top > 1.0 else 1.0  # a raw radiograph: the unattenuated level is its brightest
        return -np.log(np.clip(img / scale, 1e-6, None))
    if value == "display":
        return np.expm1(np.clip(img, 0.0, 1.0) * np.log1p(DISPLAY_MAX))
    raise CtwinError(f"unknown image value {value!r}; the sidecar's value is line_integral, intensity or display")


def _sidecar_for(path: Path) -> Path | None:
    for cand in (path.with_suffix(".json"), path.with_name(path.name + ".json")):
        if cand.is_file():
            return cand
    return None


def _read_sidecar(p: Path) -> dict:
    try:
        d = read_json(p)
    except ValueError as exc:
        raise CtwinError(f"{p.name} is not valid JSON: {exc}") from None
    if not isinstance(d, dict):
        raise CtwinError(f"{p.name}: a geometry sidecar is a JSON object")
    return d


def _dicom_geometry(ds, name: str, twin_bbox) -> Geometry:
    """A geometry from a projection radiograph's tags; the isocentre at the twin's CT box centre."""
    def tag(key):
        v = getattr(ds, key, None)
        if v is None or v == "":
            raise CtwinError(f"{name}: DICOM without a geometry sidecar needs the tag {key}; "
                             "give the image with a sidecar JSON (ctwin render's keys)")
        return v

    sdd = float(tag("DistanceSourceToDetector"))
    spd = float(tag("DistanceSourceToPatient"))
    sp = getattr(ds, "ImagerPixelSpacing", None) or tag("PixelSpacing")
    primary = float(tag("PositionerPrimaryAngle"))
    secondary = float(getattr(ds, "PositionerSecondaryAngle", 0.0) or 0.0)
    rows, cols = int(ds.Rows), int(ds.Columns)
    if twin_bbox is None:
        raise CtwinError(f"{name}: a DICOM geometry needs the twin (its isocentre is the CT box centre)")
    # DICOM PS3.3 C.8.7.5: primary angle > 0 towards the patient's left (LAO), secondary > 0 cranial
    g = named_view("pa", twin_bbox, sad_mm=spd, sid_mm=sdd, size=(cols, rows),
                   lao=primary, cranial=secondary)
    return Geometry(g.source_mm, g.detector_center_mm, g.detector_u, g.detector_v,
                    (float(sp[1]), float(sp[0])), (cols, rows), False, g.extra)


def load_xray(path, twin_bbox=None) -> XRay:
    """Read an input image: TIFF + sidecar JSON, or DICOM (with a sidecar or projection tags)."""
    path = Path(path)
    if path.suffix == "" and path.with_suffix(".tif").is_file():
        path = path.with_suffix(".tif")
    if not path.is_file():
        raise CtwinError(f"X-ray image not found: {path}")
    suffix = path.suffix.lower()
    sc_path = _sidecar_for(path)
    sidecar = _read_sidecar(sc_path) if sc_path is not None else None
    if suffix in (".tif", ".tiff"):
        import tifffile

        if sidecar is None:
            raise CtwinError(f"{path.name}: no geometry sidecar ({path.stem}.json) beside the image")
        try:
            img = np.asarray(tifffile.imread(path), dtype=np.float64)
        except Exception as exc:  # noqa: BLE001 - any reader failure is a bad input
            raise CtwinError(f"cannot read {path.name}: {exc}") from None
        geom = Geometry.from_sidecar(sidecar)
        value = str(sidecar.get("value", "line_integral"))
    elif suffix in (".dcm", ".dicom", "") or _is_dicom(path):
        try:
            import pydicom
        except ImportError:
            raise CtwinError(f"{path.name}: reading DICOM needs pydicom (pip install pydicom)") from None
        try:
            ds = pydicom.dcmread(path)
            img = np.asarray(ds.pixel_array, dtype=np.float64)
        except Exception as exc:  # noqa: BLE001
            raise CtwinError(f"cannot read {path.name} as DICOM: {exc}") from None
        slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
        img = img * slope + float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
        if sidecar is not None:
            geom = Geometry.from_sidecar(sidecar)
            value = str(sidecar.get("value", "display"))
        else:
            geom = _dicom_geometry(ds, path.name, twin_bbox)
            value = "display"
            sidecar = {}
        if value == "display":
            lo, hi = float(img.min()), float(img.max())
            img = (img - lo) / (hi - lo) if hi > lo else img * 0.0
            if str(getattr(ds, "PhotometricInterpretation", "")) == "MONOCHROME1":
                img = 1.0 - img  # MONOCHROME1: bright = low attenuation
    else:
        raise CtwinError(f"{path.name}: X-ray images are TIFF with a sidecar JSON, or DICOM")
    if img.ndim != 2:
        raise CtwinError(f"{path.name}: expected a single-channel 2-D image, got shape {img.shape}")
    if (img.shape[1], img.shape[0]) != tuple(geom.size_px):
        raise CtwinError(f"{path.name}: image is {img.shape[1]}x{img.shape[0]} but its geometry says "
                         f"{geom.size_px[0]}x{geom.size_px[1]}")
    if not np.all(np.isfinite(img)):
        raise CtwinError(f"{path.name}: the image holds NaN or infinite values")
    photons = sidecar.get("photons") if isinstance(sidecar, dict) else None
    photons = float(photons) if isinstance(photons, (int, float)) and photons > 0 else None
    return XRay(path.stem, to_line_integral(img, value), geom, value, str(path), dict(sidecar), photons)


def _is_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
        return head[128:132] == b"DICM"
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# bone clouds and splatted bone DRRs
# --------------------------------------------------------------------------------------------
@dataclass
class BoneCloud:
    names: list  # structure names (bones), index = owner
    points: np.ndarray  # (N, 3) world mm at the acquisition pose
    weight: np.ndarray  # (N,) excess attenuation x volume (mm^2)
    owner: np.ndarray  # (N,) int32: the structure of the point (a blended point's largest weight)
    spacing_mm: float
    # blended points (soft tissue): (N, K) structures and weights, each row's weights sum to 1 in
    # decreasing order (zeros last); a point moves by sum_k w_k T[owner_k]. None: all rigid.
    mix_owner: np.ndarray | None = None
    mix_w: np.ndarray | None = None
    soft_spacing_mm: float = 0.0  # the soft-tissue blocks' size (0: none)

    @property
    def bone(self) -> np.ndarray:
        """(S,) bool: which structures are bones (not the soft tissue or the table)."""
        return np.array([not n.startswith("_") for n in self.names])

    @property
    def soft(self) -> np.ndarray:
        """(S,) bool: which structures are soft-tissue blocks."""
        return np.array([n.startswith("_soft:") for n in self.names])

    def blend(self, sel=None) -> tuple[np.ndarray, np.ndarray]:
        """(owners (N, K) int32, weights (N, K)) of the points (or of those in ``sel``), as the
        splat kernel reads them; a rigid cloud is K = 1 with weight 1."""
        if self.mix_owner is None:
            own = self.owner if sel is None else self.owner[sel]
            return np.ascontiguousarray(own.reshape(-1, 1), dtype=np.int32), np.ones((len(own), 1))
        if sel is None:
            return self.mix_owner, self.mix_w
        return np.ascontiguousarray(self.mix_owner[sel]), np.ascontiguousarray(self.mix_w[sel])

    def subset(self, sel) -> "BoneCloud":
        """The points in ``sel`` (same structures)."""
        mo, mw = (None, None) if self.mix_owner is None else self.blend(sel)
        return BoneCloud(self.names, np.ascontiguousarray(self.points[sel]), np.ascontiguousarray(self.weight[sel]),
                         np.ascontiguousarray(self.owner[sel]), self.spacing_mm, mo, mw, self.soft_spacing_mm)


def bone_cloud(twin, bone_hu: float = BONE_HU, spacing_mm: float = CLOUD_SPACING_MM,
               soft_spacing_mm: float | None = SOFT_SPACING_MM, soft_blend: bool = False,
               soft_uniform: bool = False) -> BoneCloud:
    """The twin's bones as weighted point clouds (see the module docstring), plus, unless
    ``soft_spacing_mm`` is None, the soft tissue pooled in blocks and the static part (table): the
    moving image then has the body outline that the X-ray has. Each soft-tissue block moves
    rigidly with the joint of its largest skinning weight, or with ``soft_blend`` by the linear
    blend of its joints' transforms, weighted by the twin's skinning weights at its centre (up to
    ``MIX_JOINTS``, as the renderer's soft-tissue warp blends them). Its attenuation is the CT's,
    or with ``soft_uniform`` water wherever the body is (``SOFT_BODY_HU``). The defaults are the
    measured best on the phantom benchmark (README, "Pose from X-ray")."""
    art = twin.articulated
    rigid = twin.binding.rigid
    vox = np.abs(np.linalg.det(art.affine[:3, :3]))
    sp = float(np.min(np.linalg.norm(art.affine[:3, :3], axis=0)))
    f = max(1, int(round(spacing_mm / sp)))
    names, pts, wts, own = [], [], [], []
    for p in art.parts:
        if p.kind != "bone" or p.name not in rigid:
            continue
        hu = p.data.astype(np.float32)
        sel = (p.mask > 0) & (hu > bone_hu)
        if not sel.any():
            continue
        ijk = np.argwhere(sel)
        w = (hu[sel] / 1000.0 * MU_WATER_PER_MM * vox).astype(np.float64)
        if f > 1:  # pool f^3 blocks: weight sums at weighted centroids
            key = ijk // f
            _, inv = np.unique(key, axis=0, return_inverse=True)
            inv = inv.reshape(-1)
            ws = np.bincount(inv, weights=w)
            ijk = np.stack([np.bincount(inv, weights=w * ijk[:, a]) / ws for a in range(3)], axis=1)
            w = ws
        A = p.affine
        world = apply_transform(A, ijk)
        own.append(np.full(len(w), len(names), np.int32))
        names.append(p.name)
        pts.append(world)
        wts.append(w)
    if not names:
        raise CtwinError("the twin has no bones to register (no skeletal structure in its articulated CT)")
    mix_o, mix_w = [np.c_[o] for o in own], [np.ones((len(o), 1)) for o in own]
    if soft_spacing_mm:
        fs = max(1, int(round(soft_spacing_mm / sp)))
        for src, hu_vol, offset in _soft_sources(art):
            if src == "soft" and soft_uniform:  # water wherever the body is (lung included)
                hu_vol = np.where(hu_vol > SOFT_BODY_HU, 0, -1000).astype(np.int16)
            ijk, w = _pool_blocks(hu_vol, fs, vox)
            if not len(w):
                continue
            A = art.affine.copy()
            A[:3, 3] = art.affine[:3, :3] @ offset + art.affine[:3, 3]
            world = apply_transform(A, ijk)
            if src == "static":
                own.append(np.full(len(w), len(names), np.int32))
                mix_o.append(own[-1][:, None])
                mix_w.append(np.ones((len(w), 1)))
                names.append("_static")
            elif art.weights.shape[-1]:
                jt, bw = _skinning_at(art, world, MIX_JOINTS) if soft_blend else _largest_weight_joint(art, world)
                sidx = {}
                for j in np.unique(jt[bw > 0]):
                    sidx[int(j)] = len(names)
                    names.append(f"_soft:{JOINT_NAMES[j]}")
                lut = np.zeros(N_JOINTS, np.int32)
                for j, k in sidx.items():
                    lut[j] = k
                mo = lut[jt]
                mo = np.where(bw > 0, mo, mo[:, :1])  # unused slots: the first structure, weight 0
                grp = np.argsort(mo[:, 0], kind="stable")  # the blocks grouped by structure
                mo, bw, world, w = mo[grp], bw[grp], world[grp], w[grp]
                own.append(mo[:, 0].copy())
                mix_o.append(mo)
                mix_w.append(bw)
            else:
                continue
            pts.append(world)
            wts.append(w)
    K = max(m.shape[1] for m in mix_o)
    pad = [(np.pad(o, ((0, 0), (0, K - o.shape[1])), mode="edge"), np.pad(b, ((0, 0), (0, K - b.shape[1]))))
           for o, b in zip(mix_o, mix_w)]
    mo = np.ascontiguousarray(np.concatenate([p[0] for p in pad]), dtype=np.int32)
    mw = np.ascontiguousarray(np.concatenate([p[1] for p in pad]), dtype=np.float64)
    blended = K > 1
    soft_mm = float(sp * max(1, int(round(soft_spacing_mm / sp)))) if soft_spacing_mm else 0.0
    return BoneCloud(names, np.concatenate(pts), np.concatenate(wts), np.concatenate(own).astype(np.int32),
                     float(sp * f), mo if blended else None, mw if blended else None, soft_mm)


def _largest_weight_joint(art, world: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(joints (N, 1), ones (N, 1)): the joint of the largest skinning weight at the nearest node
    of the coarse weight field."""
    idx = np.rint(apply_transform(np.linalg.inv(art.weight_affine), world)).astype(np.int64)
    idx = np.clip(idx, 0, np.array(art.weights.shape[:3]) - 1)
    ch = np.argmax(art.weights[idx[:, 0], idx[:, 1], idx[:, 2]], axis=1)
    return np.asarray(art.weight_joints)[ch][:, None], np.ones((len(world), 1))


def _skinning_at(art, world: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(joints (N, k), weights (N, k)): the ``k`` largest of the articulated CT's skinning weights at
    world points (the coarse field interpolated trilinearly, as the renderer's warp blends it),
    renormalised to sum 1, in decreasing order; slots beyond a point's non-zero weights hold 0."""
    wi = np.linalg.inv(art.weight_affine)
    idx = apply_transform(wi, world).T
    C = art.weights.shape[-1]
    wv = np.empty((len(world), C))
    for c in range(C):
        wv[:, c] = map_coordinates(np.asarray(art.weights[..., c], dtype=np.float64), idx, order=1, mode="nearest")
    order = np.argsort(-wv, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(wv, order, axis=1)
    top[top < 0] = 0.0
    tot = top.sum(axis=1, keepdims=True)
    top = np.where(tot > 0, top / np.where(tot > 0, tot, 1.0), np.eye(1, k))
    used = max(1, int((top > 0).any(axis=0).sum()))  # the slots some point uses
    return np.asarray(art.weight_joints)[order[:, :used]], np.ascontiguousarray(top[:, :used])


def pool_cloud(cloud: BoneCloud, spacing_mm: float) -> BoneCloud:
    """The cloud pooled per structure on a world grid of ``spacing_mm``: weights summed at their
    weighted centroids (the same image at a resolution that does not resolve the grid). Blended
    points are pooled with the points of the same structures in their cell, their blend weights
    averaged."""
    if spacing_mm <= 1.5 * cloud.spacing_mm:
        return cloud
    cell = np.floor(cloud.points / spacing_mm).astype(np.int64)
    cell -= cell.min(axis=0)
    mo, mw = cloud.blend()
    srt = np.argsort(mo, axis=1, kind="stable")  # the owners in index order: one key per set
    mo_s, mw_s = np.take_along_axis(mo, srt, axis=1), np.take_along_axis(mw, srt, axis=1)
    # pooled points in the order of (structures, cell): the splat's sums, hence the search, are
    # sensitive to the order in the last bits
    _, inv = np.unique(np.concatenate([mo_s.astype(np.int64), cell], axis=1), axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    w = np.bincount(inv, weights=cloud.weight)
    n = len(w)
    safe = np.where(w > 0, w, 1.0)
    pts = np.stack([np.bincount(inv, weights=cloud.weight * cloud.points[:, a]) / safe for a in range(3)], axis=1)
    own_s = np.zeros((n, mo.shape[1]), np.int32)
    own_s[inv] = mo_s
    bw_s = np.stack([np.bincount(inv, weights=cloud.weight * mw_s[:, k], minlength=n) / safe
                     for k in range(mo.shape[1])], axis=1)
    back = np.argsort(-bw_s, axis=1, kind="stable")  # decreasing weights again
    own2, bw2 = np.take_along_axis(own_s, back, axis=1), np.take_along_axis(bw_s, back, axis=1)
    keep = w > 0
    blended = cloud.mix_owner is not None
    return BoneCloud(cloud.names, np.ascontiguousarray(pts[keep]), w[keep], np.ascontiguousarray(own2[keep, 0]),
                     float(spacing_mm), np.ascontiguousarray(own2[keep]) if blended else None,
                     np.ascontiguousarray(bw2[keep]) if blended else None, cloud.soft_spacing_mm)


def _soft_sources(art):
    """(kind, HU array, voxel offset) of the soft tissue and the static part (table)."""
    yield "soft", art.soft, np.zeros(3)
    for p in art.parts:
        if p.kind == "static":
            hu = np.where(p.mask > 0, p.data, -1000).astype(np.int16)
            yield "static", hu, p.offset_on(art.affine).astype(np.float64)


def _pool_blocks(hu: np.ndarray, f: int, vox: float):
    """Full attenuation (SPEC 5) summed over f^3 blocks: (block centres in voxel index, weights)."""
    n = np.array(hu.shape)
    m = -(-n // f) * f
    buf = np.full(tuple(m), -1000, np.int16)
    buf[:n[0], :n[1], :n[2]] = hu
    mu = np.maximum(0.0, MU_WATER_PER_MM * (1.0 + buf.astype(np.float32) / 1000.0)) * vox
    b = mu.reshape(m[0] // f, f, m[1] // f, f, m[2] // f, f).sum(axis=(1, 3, 5))
    keep = b > 0.05 * MU_WATER_PER_MM * vox * f ** 3  # blocks with at least 5 % of water
    ijk = np.argwhere(keep).astype(np.float64) * f + (f - 1) / 2.0
    return ijk, b[keep].astype(np.float64)


def _kernel():
    import numba

    @numba.njit(cache=True, nogil=True)
    def splat(pts, w, owner, bw, T, P, src, parallel, area, out):
        H, W = out.shape
        K = owner.shape[1]
        for n in range(pts.shape[0]):
            px, py, pz = pts[n, 0], pts[n, 1], pts[n, 2]
            x = 0.0
            y = 0.0
            z = 0.0
            for k in range(K):  # linear blend of the owners' transforms (weights in decreasing order)
                b = bw[n, k]
                if b <= 0.0:
                    break
                o = owner[n, k]
                x += b * (T[o, 0, 0] * px + T[o, 0, 1] * py + T[o, 0, 2] * pz + T[o, 0, 3])
                y += b * (T[o, 1, 0] * px + T[o, 1, 1] * py + T[o, 1, 2] * pz + T[o, 1, 3])
                z += b * (T[o, 2, 0] * px + T[o, 2, 1] * py + T[o, 2, 2] * pz + T[o, 2, 3])
            hc = P[0, 0] * x + P[0, 1] * y + P[0, 2] * z + P[0, 3]
            hr = P[1, 0] * x + P[1, 1] * y + P[1, 2] * z + P[1, 3]
            hw = P[2, 0] * x + P[2, 1] * y + P[2, 2] * z + P[2, 3]
            if hw <= 1e-9:
                continue
            c = hc / hw
            r = hr / hw
            if parallel:
                val = w[n] / area
            else:
                # footprint of the pixel at depth hw, across the oblique ray: area (hw/sid)^2 cos
                dx, dy, dz = x - src[0], y - src[1], z - src[2]
                dist = math.sqrt(dx * dx + dy * dy + dz * dz)
                val = w[n] * src[3] * src[3] * dist / (area * hw * hw * hw)
            c0 = math.floor(c)
            r0 = math.floor(r)
            fc = c - c0
            fr = r - r0
            ic = int(c0)
            ir = int(r0)
            if ic >= 0 and ic < W - 1 and ir >= 0 and ir < H - 1:
                out[ir, ic] += val * (1 - fc) * (1 - fr)
                out[ir, ic + 1] += val * fc * (1 - fr)
                out[ir + 1, ic] += val * (1 - fc) * fr
                out[ir + 1, ic + 1] += val * fc * fr
            elif ic >= -1 and ic < W and ir >= -1 and ir < H:
                for dr in range(2):
                    for dc in range(2):
                        rr = ir + dr
                        cc = ic + dc
                        if rr >= 0 and rr < H and cc >= 0 and cc < W:
                            ww = (fc if dc else 1 - fc) * (fr if dr else 1 - fr)
                            out[rr, cc] += val * ww

    return splat


_SPLAT = None


def _splat_fn():
    global _SPLAT
    if _SPLAT is None:
        _SPLAT = _kernel()
    return _SPLAT


@dataclass
class _View:
    geometry: Geometry
    P: np.ndarray
    src: np.ndarray  # (source xyz, sid)
    area: float

    @classmethod
    def of(cls, g: Geometry) -> "_View":
        return cls(g, g.projection_matrix(), np.r_[g.source_mm, g.sid_mm],
                   float(g.pixel_spacing_mm[0] * g.pixel_spacing_mm[1]))


def splat_bones(cloud_pts, cloud_w, owner, transforms, view: _View, out=None, blend=None) -> np.ndarray:
    """Bone line-integral image (H, W) of points moved by ``transforms`` (S, 4, 4) per owner
    (``owner`` (N,)), or by the blend of their owners' transforms (``owner`` (N, K) with
    ``blend`` (N, K) weights)."""
    g = view.geometry
    if out is None:
        out = np.zeros((g.height, g.width), np.float64)
    T = np.ascontiguousarray(np.asarray(transforms, dtype=np.float64)[:, :3, :])
    owner = np.asarray(owner)
    if owner.ndim == 1:
        owner = owner.reshape(-1, 1)
        blend = np.ones(owner.shape) if blend is None else np.asarray(blend, dtype=np.float64).reshape(-1, 1)
    _splat_fn()(cloud_pts, cloud_w, np.ascontiguousarray(owner, dtype=np.int32),
                np.ascontiguousarray(blend, dtype=np.float64), T, view.P, view.src, bool(g.parallel), view.area, out)
    return out


def splat_cloud(cloud: BoneCloud, transforms, view: _View, out=None) -> np.ndarray:
    """``splat_bones`` of a whole cloud (its blended points with their blends)."""
    own, bw = cloud.blend()
    return splat_bones(cloud.points, cloud.weight, own, transforms, view, out, bw)


def bone_drr(twin, geometry: Geometry, pose=None, transl_mm=None, cloud: BoneCloud | None = None,
             bones_only: bool = True) -> np.ndarray:
    """The splatted DRR of the twin's bones at a pose (line integrals of excess attenuation), or
    with ``bones_only=False`` of the whole cloud (bones + coarse soft tissue + table)."""
    cloud = bone_cloud(twin) if cloud is None else cloud
    pose = twin.pose0 if pose is None else pose
    T = _Problem(twin, cloud, [], pose, twin.transl0_mm if transl_mm is None else transl_mm, True).transforms(
        pose, twin.transl0_mm if transl_mm is None else transl_mm)
    sel = cloud.bone[cloud.owner] if bones_only else np.ones(len(cloud.owner), bool)
    return splat_cloud(cloud.subset(sel), T, _View.of(geometry))


# --------------------------------------------------------------------------------------------
# similarity
# --------------------------------------------------------------------------------------------
def _resample(img: np.ndarray, w: int, h: int) -> np.ndarray:
    """Area-average (or interpolate) an image onto a (h, w) grid covering the same detector."""
    H, W = img.shape
    if (H, W) == (h, w):
        return img.copy()
    if H % h == 0 and W % w == 0:
        return img.reshape(h, H // h, w, W // w).mean(axis=(1, 3))

    sm = gaussian_filter(img, (max(0.0, 0.5 * (H / h - 1)), max(0.0, 0.5 * (W / w - 1))))
    rr = (np.arange(h) + 0.5) * H / h - 0.5
    cc = (np.arange(w) + 0.5) * W / w - 0.5
    R, C = np.meshgrid(rr, cc, indexing="ij")
    return map_coordinates(sm, [R, C], order=1, mode="nearest")


_GAUSS: dict = {}  # sigma -> the weights that ``gaussian_filter`` correlates with (truncated at 4 sigma)


def _gaussian_weights(sigma: float) -> np.ndarray:
    """``gaussian_filter``'s 1-D kernel for ``sigma`` (scipy's own: the filter of a unit impulse),
    kept per sigma."""
    w = _GAUSS.get(sigma)
    if w is None:
        r = int(4.0 * sigma + 0.5)
        impulse = np.zeros(2 * r + 1)
        impulse[r] = 1.0
        w = _GAUSS[sigma] = np.ascontiguousarray(gaussian_filter1d(impulse, sigma, mode="constant")[::-1])
    return w


def target_image(x: XRay, w: int, h: int) -> np.ndarray:
    """The X-ray's line integrals as a level compares them: photon-starved pixels capped at the noise
    floor (``line_integral_ceiling``), resampled to w x h."""
    img = x.image if not x.photons else np.minimum(x.image, line_integral_ceiling(x.photons))
    return _resample(img, w, h)


def _grad_pair(img: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    img = np.asarray(img)
    if sigma > 1e-15:  # gaussian_filter(img, sigma, mode="nearest") with the kernel kept
        w = _gaussian_weights(float(sigma))
        s = np.empty(img.shape, img.dtype)
        correlate1d(img, w, 0, s, mode="nearest")
        correlate1d(s, w, 1, s, mode="nearest")
    else:
        s = gaussian_filter(img, sigma, mode="nearest")
    gx = s[1:-1, 2:] - s[1:-1, :-2]
    gy = s[2:, 1:-1] - s[:-2, 1:-1]
    return gx, gy


def _normalised(a: np.ndarray) -> np.ndarray | None:
    a = a - a.mean()
    n = float(np.sqrt((a * a).sum()))
    return a / n if n > 0 else None


def gradient_correlation(a: np.ndarray, b: np.ndarray, sigma: float = 1.0) -> float:
    """Gradient correlation of two images (Penney et al. 1998): mean NCC of the two gradients."""
    ga, gb = _grad_pair(a, sigma), _grad_pair(b, sigma)
    out = 0.0
    for x, y in zip(ga, gb):
        nx, ny = _normalised(x), _normalised(y)
        if nx is not None and ny is not None:
            out += float((nx * ny).sum())
    return 0.5 * out


class _Level:
    """One resolution level: the views at that size and the targets' normalised gradients."""

    def __init__(self, xrays, size: int, cloud: BoneCloud):
        self.views, self.targets, self.sigma, self.soft_sigma = [], [], [], []
        px_iso = []
        for x in xrays:
            g0 = x.geometry
            scale = size / max(g0.width, g0.height)
            g = g0.with_size(max(8, int(round(g0.width * scale))), max(8, int(round(g0.height * scale))))
            mag = g.magnification
            px_iso.append(min(g.pixel_spacing_mm) / mag)
        # points at half a pixel (at the isocentre) are as good as finer ones once blurred
        self.cloud = pool_cloud(cloud, 0.5 * min(px_iso))
        spacing_mm = self.cloud.spacing_mm
        for x in xrays:
            g0 = x.geometry
            scale = size / max(g0.width, g0.height)
            w = max(8, int(round(g0.width * scale)))
            h = max(8, int(round(g0.height * scale)))
            g = g0.with_size(w, h) if (w, h) != tuple(g0.size_px) else g0
            v = _View.of(g)
            # blur: at least one pixel, and the cloud's spacing as it projects at the isocentre
            mag = g.magnification
            px_mm = min(g.pixel_spacing_mm) / mag
            sigma = max(1.0, 0.6 * spacing_mm / px_mm)
            # the soft-tissue blocks spread over their size (see SOFT_BLUR)
            self.soft_sigma.append(SOFT_BLUR * self.cloud.soft_spacing_mm / px_mm)
            gx, gy = _grad_pair(target_image(x, w, h), sigma)
            self.views.append(v)
            self.targets.append((_normalised(gx), _normalised(gy)))
            self.sigma.append(sigma)
        self.size = size
        # the soft tissue as a channel of its own only where it is smoothed (one image otherwise:
        # the splat's sums, hence the search, are sensitive to their order in the last bits)
        self.soft_points = self.cloud.soft[self.cloud.owner] if max(self.soft_sigma, default=0.0) > 0 \
            else np.zeros(len(self.cloud.owner), bool)
        self.hard_cloud = self.cloud.subset(~self.soft_points)
        self.soft_cloud = self.cloud.subset(self.soft_points) if self.soft_points.any() else None

    def compose(self, k: int, hard: np.ndarray, soft: np.ndarray | None) -> tuple:
        """View k's image as (bones and table, the soft-tissue blocks' image smoothed over the
        blocks' size or None); ``score`` takes these pairs."""
        if soft is None or self.soft_sigma[k] <= 0:
            return hard, soft
        return hard, gaussian_filter(soft, self.soft_sigma[k], mode="constant")

    def render(self, T, views) -> list:
        """The images of the whole cloud moved by the structures' transforms ``T``."""
        out = []
        hard, soft = self.hard_cloud, self.soft_cloud
        for k, v in enumerate(views):
            out.append(self.compose(k, splat_cloud(hard, T, v), None if soft is None else splat_cloud(soft, T, v)))
        return out

    def score(self, images) -> float:
        """Summed gradient correlation of the views' images (arrays, or the (bones and table, soft
        tissue) pairs of ``compose``) with the targets."""
        s = 0.0
        for img, (tx, ty), sig in zip(images, self.targets, self.sigma):
            if isinstance(img, tuple):
                img = img[0] if img[1] is None else img[0] + img[1]
            gx, gy = _grad_pair(img, sig)
            for a, t in ((gx, tx), (gy, ty)):
                if t is None:
                    continue
                a -= a.mean()  # in place: a is _grad_pair's own array
                prod = np.multiply(a, a)
                n = float(np.sqrt(prod.sum()))
                if n > 0:
                    s += 0.5 * float(np.multiply(a, t, out=prod).sum()) / n
        return s


# --------------------------------------------------------------------------------------------
# the registration
# --------------------------------------------------------------------------------------------
@dataclass
class Registration:
    pose: np.ndarray  # (72,)
    transl_mm: np.ndarray  # (3,)
    joints_mm: np.ndarray  # (24, 3) posed world joints
    similarity: float  # summed gradient correlation at the finest level
    stages: list  # per stage: name, level, params, evals, before, after, seconds
    seconds: float
    geometries: list  # the (refined) geometry of each view
    init_pose: np.ndarray
    init_transl_mm: np.ndarray


def _structure_joints(binding, names) -> list:
    """For each structure, the set of joints whose rotation moves it (its joints and their ancestors)."""
    out = []
    for n in names:
        if n == "_static":
            out.append(set())
            continue
        if n.startswith("_soft:"):
            j = JOINT_INDEX[n[6:]]
            anc = set()
            while j >= 0:
                anc.add(int(j))
                j = int(PARENTS[j])
            out.append(anc)
            continue
        bone = binding.rigid[n]
        vb = binding.vertebrae.get(bone)
        js = {vb.lower, vb.upper} if vb is not None else {JOINT_INDEX[bone]}
        anc = set()
        for j in js:
            while j >= 0:
                anc.add(int(j))
                j = int(PARENTS[j])
        out.append(anc)
    return out


def _limits(joint: int) -> np.ndarray:
    """(3, 2) radian bounds on a joint's axis-angle components (root: none)."""
    name = JOINT_NAMES[joint]
    lim = JOINT_LIMITS_DEG.get(name)
    b = np.tile([-math.pi, math.pi], (3, 1)).astype(np.float64)
    if lim is None:
        return b
    mx, axes = lim
    b[:, 0], b[:, 1] = -math.radians(mx), math.radians(mx)
    for ax, (lo, hi) in (axes or {}).items():
        b[ax] = (math.radians(lo), math.radians(hi))
    return b


def _depth_mirrored(armature, pose, start_pose, joints, normal) -> np.ndarray:
    """The pose with the chain ``joints`` (parents first) mirrored in depth: each joint's world
    rotation relative to the start pose ``D`` replaced by ``M D M`` (``M`` the reflection through
    the plane perpendicular to the unit ``normal``), so a bone that lay in that plane at the start
    points along its former direction reflected through the plane; the joints below the chain
    keep their local rotations, each result is clipped to its joint's limits."""
    n = np.asarray(normal, dtype=np.float64).reshape(3)
    n = n / np.linalg.norm(n)
    M = np.eye(3) - 2.0 * np.outer(n, n)
    G = armature.world_transforms(pose)[:, :3, :3]
    G0 = armature.world_transforms(start_pose)[:, :3, :3]
    out = np.asarray(pose, dtype=np.float64).reshape(72).copy()
    new = {}
    for j in sorted(joints):
        g = M @ (G[j] @ G0[j].T) @ M @ G0[j]
        gp = new.get(int(PARENTS[j]), G[PARENTS[j]])
        lim = _limits(j)
        out[3 * j:3 * j + 3] = np.clip(rotation_to_rotvec(gp.T @ g), lim[:, 0], lim[:, 1])
        new[j] = gp @ rodrigues(out[3 * j:3 * j + 3])
    return out


class _Problem:
    def __init__(self, twin, cloud: BoneCloud, xrays, pose0, transl0, articulated: bool):
        self.twin, self.cloud, self.xrays = twin, cloud, xrays
        self.binding = twin.binding
        self.pose = np.asarray(pose0, dtype=np.float64).reshape(72).copy()
        self.transl = np.asarray(transl0, dtype=np.float64).reshape(3).copy()
        self.start_pose = self.pose.copy()
        self.sjoints = _structure_joints(self.binding, cloud.names)
        self.articulated = articulated
        self.prior_weight = PRIOR_WEIGHT if len(xrays) >= 2 else PRIOR_WEIGHT_ONE_VIEW
        self.evals = 0
        self.root_range = (ROOT_RANGE_DEG, ROOT_RANGE_MM)
        self.view_T = [np.eye(4) for _ in xrays]  # geometry corrections (refine_geometry)
        arm = self.binding.armature
        self.W0inv = np.linalg.inv(arm.world_transforms(arm.pose0, arm.transl0_mm))
        self._fk = ForwardKinematics(arm.joints_rest_mm)  # as arm.world_transforms poses the joints
        # per structure: what gives its transform (a joint's, the identity, or a vertebra bone's
        # blend of two joints') and the index of that joint or vertebra bone
        S = len(cloud.names)
        self._kind = np.zeros(S, np.int8)  # 0: joint, 1: static (identity), 2: vertebra bone
        self._ref = np.zeros(S, np.intp)
        vbs, slot = [], {}
        for i, n in enumerate(cloud.names):
            if n == "_static":
                self._kind[i] = 1
                continue
            if n.startswith("_soft:"):
                self._ref[i] = JOINT_INDEX[n[6:]]
                continue
            bone = self.binding.rigid[n]
            vb = self.binding.vertebrae.get(bone)
            if vb is None:
                self._ref[i] = JOINT_INDEX[bone]
                continue
            if id(vb) not in slot:
                slot[id(vb)] = len(vbs)
                vbs.append(vb)
            self._kind[i], self._ref[i] = 2, slot[id(vb)]
        self._vb = (np.array([v.lower for v in vbs], np.intp), np.array([v.upper for v in vbs], np.intp),
                    np.array([v.w for v in vbs], np.float64),
                    np.array([v.anchor_mm for v in vbs], np.float64).reshape(-1, 3))
        self._plans = {}  # structure selection -> where its transforms come from (``transforms``)
        self._joint_terms = {}  # joint -> (prior sigmas (3,), lower limits (3,), upper limits (3,))
        self._root_rot = (None, None)  # (root rotation vector bytes, its matrix) of ``_apply``

    def _plan(self, idx):
        key = None if idx is None else np.asarray(idx, np.intp).tobytes()
        plan = self._plans.get(key)
        if plan is None:
            sel = np.arange(len(self._kind)) if idx is None else np.asarray(idx, np.intp)
            kind, ref = self._kind[sel], self._ref[sel]
            pj, ps, pv = (np.flatnonzero(kind == k) for k in (0, 1, 2))
            slots, inv = np.unique(ref[pv], return_inverse=True)
            vb = tuple(a[slots] for a in self._vb)
            plan = self._plans[key] = (len(sel), pj, ref[pj], ps, pv, vb, inv.reshape(-1))
        return plan

    def transforms(self, pose, transl, idx=None) -> np.ndarray:
        """(S, 4, 4) acquisition -> posed transforms of the cloud's structures (or those in idx)."""
        d = self._fk(pose)  # arm.world_transforms(pose, transl), the unchanged joints kept
        d[:, :3, 3] += np.asarray(transl, dtype=np.float64).reshape(3)
        d = d @ self.W0inv
        n, pj, rj, ps, pv, vb, inv = self._plan(idx)
        out = np.empty((n, 4, 4))
        out[pj] = d[rj]
        out[ps] = np.eye(4)
        if len(pv):
            out[pv] = vertebra_transforms(d, *vb, rotvec=_rotvec)[inv]
        return out

    def _apply(self, joints, x, base_pose, base_transl):
        pose, transl = base_pose.copy(), base_transl.copy()
        k = 0
        for j in joints:
            if j == 0:
                key = base_pose[0:3].tobytes()
                if self._root_rot[0] != key:
                    self._root_rot = (key, rodrigues(base_pose[0:3]))
                R = rodrigues(x[k:k + 3] * ROT_UNIT) @ self._root_rot[1]
                pose[0:3] = rotation_to_rotvec(R)
                transl = base_transl + x[k + 3:k + 6] * TRANS_UNIT
                k += 6
            else:
                pose[3 * j:3 * j + 3] = base_pose[3 * j:3 * j + 3] + x[k:k + 3] * ROT_UNIT
                k += 3
        return pose, transl

    def _terms_of(self, j: int) -> tuple:
        """(prior sigmas (3,) radians, lower and upper limits (3,) radians) of joint j."""
        t = self._joint_terms.get(j)
        if t is None:
            sig = PRIOR_AXIS_SIGMA_DEG.get(JOINT_NAMES[j], (None, None, None))
            lim = _limits(j)
            t = self._joint_terms[j] = (np.radians([PRIOR_SIGMA_DEG if v is None else v for v in sig]),
                                        lim[:, 0].copy(), lim[:, 1].copy())
        return t

    def _penalty(self, pose, joints) -> float:
        p = 0.0
        for j in joints:
            if j == 0:
                continue
            sig, lo, hi = self._terms_of(j)
            r = pose[3 * j:3 * j + 3]
            d = r - self.start_pose[3 * j:3 * j + 3]
            p += self.prior_weight * float(np.sum((d / sig) ** 2))
            ex = np.maximum(lo - r, 0) + np.maximum(r - hi, 0)
            p += 10.0 * float(ex @ ex)
        return p

    def step_bounds(self, joints, base_pose) -> tuple:
        """(lower, upper) bounds, in optimiser units, of the steps from ``base_pose`` over ``joints``
        (``_apply``'s x): the root within its capture range (``root_range``) around the stage's
        start, each joint within its anatomical range (``_limits``), widened to include no step."""
        bounds = []
        for j in joints:
            if j == 0:
                r, t = math.radians(self.root_range[0]) / ROT_UNIT, self.root_range[1] / TRANS_UNIT
                bounds += [(-r, r)] * 3 + [(-t, t)] * 3
            else:
                cur = base_pose[3 * j:3 * j + 3]
                bounds += [((lo - c) / ROT_UNIT, (hi - c) / ROT_UNIT) for (lo, hi), c in zip(_limits(j), cur)]
        return (np.array([min(lo, 0.0) for lo, _ in bounds]), np.array([max(hi, 0.0) for _, hi in bounds]))

    def level_views(self, level: _Level):
        return [_View.of(v.geometry.transformed(T)) if not np.allclose(T, np.eye(4)) else v
                for v, T in zip(level.views, self.view_T)]

    def optimise(self, level: _Level, joints, name: str, maxfev: int, starts=None, include=None,
                 search: bool = False, grid=None, evolve=None) -> dict:
        """Powell over the given joints (0 = root rotation + translation), others fixed.
        ``include``: the structures rendered (default all); ``search``: try single-axis offsets of
        each joint (+-30, +-60 degrees) first and start from the best few; ``evolve``: a global
        search first (``Evolve``: scipy's differential evolution within a box around the current
        pose, seeded, the current pose in its population), Powell then refining its best member
        as well as the current pose."""
        t0 = time.perf_counter()
        joints = list(joints)
        jset = set(joints)
        inc = np.ones(len(self.sjoints), bool) if include is None else np.asarray(include, bool)
        moving = np.array([bool(jset & s) for s in self.sjoints])
        views = self.level_views(level)
        T_now = self.transforms(self.pose, self.transl)
        cl = level.cloud
        own = cl.owner
        mo, mw = cl.blend()
        # a point moves when any of its owners (of non-zero weight) moves
        mpts = (moving[mo] & (mw > 0)).any(axis=1) & inc[own]
        spts = inc[own] & ~mpts
        # owners of the moving points re-indexed into the structures they read
        midx = np.unique(mo[mpts])
        remap = np.full(len(moving), -1, np.int32)
        remap[midx] = np.arange(len(midx), dtype=np.int32)
        parts = []  # per image channel (bones and table; soft tissue): static images, moving points
        for sel in ((~level.soft_points, level.soft_points) if level.soft_points.any() else (None,)):
            m_sel = mpts if sel is None else mpts & sel
            s_sel = spts if sel is None else spts & sel
            static = []
            for v in views:
                img = np.zeros((v.geometry.height, v.geometry.width))
                if s_sel.any():
                    splat_cloud(cl.subset(s_sel), T_now, v, img)
                static.append(img)
            parts.append((static, np.ascontiguousarray(cl.points[m_sel]), np.ascontiguousarray(cl.weight[m_sel]),
                          np.ascontiguousarray(remap[mo[m_sel]]), np.ascontiguousarray(mw[m_sel])))
        base_pose, base_transl = self.pose.copy(), self.transl.copy()
        nparam = sum(6 if j == 0 else 3 for j in joints)
        blo, bhi = self.step_bounds(joints, base_pose)
        n_ev = [0]

        bufs = [[np.empty_like(img) for img in part[0]] for part in parts]  # the images, reused

        def terms(x):
            # bounds by projection (Powell's bounded line searches leave narrow optima)
            xc = np.clip(x, blo, bhi)
            pose, transl = self._apply(joints, xc, base_pose, base_transl)
            T = np.ascontiguousarray(self.transforms(pose, transl, midx)[:, :3, :])
            imgs = []
            for k, v in enumerate(views):
                ch = []
                for (st, pm, wm, om, bm), buf in zip(parts, bufs):
                    np.copyto(buf[k], st[k])
                    ch.append(splat_bones(pm, wm, om, T, v, buf[k], bm))
                imgs.append(level.compose(k, ch[0], ch[1] if len(ch) > 1 else None))
            return level.score(imgs), float(np.sum((x - xc) ** 2)) + self._penalty(pose, joints)

        memo = {}  # x -> terms(x): Powell's line searches ask for some points again (16 % of them, measured)

        def cost(x):
            n_ev[0] += 1
            key = np.asarray(x, dtype=np.float64).tobytes()
            t = memo.get(key)
            if t is None:
                t = memo[key] = terms(x)
            return t[1] - t[0]

        x0 = np.zeros(nparam)
        before = terms(x0)[0]
        cost0 = cost(x0)
        cands = [x0] if starts is None else [x0] + list(starts)
        if search:
            for k in range(nparam):
                for off in np.radians(SEARCH_DEG):
                    x = np.zeros(nparam)
                    x[k] = off / ROT_UNIT
                    if blo[k] <= x[k] <= bhi[k]:
                        cands.append(x)
        keep = 3
        if grid:  # a joint grid over (joint, axis, offsets in radians) cells
            slot = {}
            k = 0
            for j in joints:
                slot[j] = k
                k += 6 if j == 0 else 3
            # offsets from the registration's start pose (not this stage's: a second pass
            # searches the same cells)
            axes = [(slot[j] + ax, (np.asarray(offs) + self.start_pose[3 * j + ax] - base_pose[3 * j + ax])
                     / ROT_UNIT) for j, ax, offs in grid]
            seen = set()
            for combo in itertools.product(*[v for _, v in axes]):
                x = np.zeros(nparam)
                for (k, _), v in zip(axes, combo):
                    x[k] = v
                x = np.clip(x, blo, bhi)
                key = tuple(np.round(x, 3))
                if key not in seen:
                    seen.add(key)
                    cands.append(x)
            keep = CHAIN_KEEP
        if len(cands) > 1:  # several starts: keep the best few by their cost, optimise those
            cs = [cost(c) for c in cands]
            order = np.argsort(cs)[:keep]
            cands = [cands[i] for i in order]
        if evolve is not None:
            cands.append(evolve.run(cost, joints, blo, bhi))
        best = None
        self.local_optima = [(cost0, base_pose.copy(), base_transl.copy())]  # (cost, pose, transl) per start
        for c in cands:
            r = minimize(cost, c, method="Powell", options={"xtol": 0.02, "ftol": 1e-5, "maxfev": maxfev})
            opt = self._apply(joints, np.clip(r.x, blo, bhi), base_pose, base_transl)
            self.local_optima.append((float(r.fun),) + opt)
            if best is None or r.fun < best.fun:
                best = r
        pose, transl = self._apply(joints, np.clip(best.x, blo, bhi), base_pose, base_transl)
        after = before
        if best.fun <= cost0:
            self.pose, self.transl = pose, transl
            after = terms(best.x)[0]
        self.evals += n_ev[0]
        return {"stage": name, "level": level.size, "params": nparam, "evals": n_ev[0],
                "before": before, "after": after, "seconds": time.perf_counter() - t0}

    def refine_view(self, level: _Level, k: int, maxfev: int) -> dict:
        """A rigid correction of view k's geometry relative to the patient (rotation about the
        view's isocentre or its central ray point nearest the bones, then translation)."""
        t0 = time.perf_counter()
        T_now = self.transforms(self.pose, self.transl)
        base = level.views[k]
        Tp = T_now[level.cloud.owner]
        posed = np.einsum("nij,nj->ni", Tp[:, :3, :3], level.cloud.points) + Tp[:, :3, 3]
        centre = (posed * level.cloud.weight[:, None]).sum(0) / level.cloud.weight.sum()
        T0 = self.view_T[k]

        def corr(x):
            R = rodrigues(x[:3] * ROT_UNIT * 0.5)
            T = np.eye(4)
            T[:3, :3] = R
            T[:3, 3] = centre - R @ centre + x[3:] * TRANS_UNIT
            return T @ T0

        def cost(x):
            g = base.geometry.transformed(corr(x))
            lvl = _Sub(level, k)
            return -lvl.score(lvl.render(T_now, [_View.of(g)]))

        before = -cost(np.zeros(6))
        r = minimize(cost, np.zeros(6), method="Powell", options={"xtol": 0.02, "ftol": 1e-5, "maxfev": maxfev})
        if -r.fun > before:
            self.view_T[k] = corr(r.x)
        return {"stage": f"geometry_{k}", "level": level.size, "params": 6, "evals": int(r.nfev),
                "before": before, "after": max(before, -r.fun), "seconds": time.perf_counter() - t0}

    def swap_sides(self, level: _Level, names, maxfev: int) -> dict:
        """Try the left and right limbs' poses exchanged (each mirrored in the sagittal plane: the
        rotation vector's y and z negated) and keep the better: a lateral view superimposes the
        two sides, so a search can put each side's pose on the other."""
        t0 = time.perf_counter()
        joints = [JOINT_INDEX[f"left_{n}"] for n in names] + [JOINT_INDEX[f"right_{n}"] for n in names]

        def cost(pose):
            self.pose, keep = pose, self.pose
            try:
                return self._penalty(pose, joints) - self.score(level)
            finally:
                self.pose = keep

        before = cost(self.pose)
        cand = self.pose.copy()
        mirror = np.array([1.0, -1.0, -1.0])
        for n in names:
            jl, jr = JOINT_INDEX[f"left_{n}"], JOINT_INDEX[f"right_{n}"]
            cand[3 * jl:3 * jl + 3] = self.pose[3 * jr:3 * jr + 3] * mirror
            cand[3 * jr:3 * jr + 3] = self.pose[3 * jl:3 * jl + 3] * mirror
        keep = self.pose.copy(), self.transl.copy()
        self.pose = cand
        # the exchanged pose refined with the root before it is compared (each side's pose was
        # fitted with the root and the other side where they were)
        refine = [0] + [j for j in joints if j != JOINT_INDEX.get("left_foot") and j != JOINT_INDEX.get("right_foot")
                        and JOINT_NAMES[j].split("_", 1)[1] in ("hip", "knee", "shoulder", "elbow")]
        r = self.optimise(level, refine, "swap_refine", maxfev)
        after = cost(self.pose)
        swapped = after < before
        if not swapped:
            self.pose, self.transl = keep
        return {"stage": "swap_" + names[0], "level": level.size, "params": len(refine), "evals": r["evals"],
                "before": -before, "after": -min(before, after), "swapped": bool(swapped),
                "seconds": time.perf_counter() - t0}

    def mirror_depth(self, level: _Level, joints, maxfev: int) -> dict:
        """One view: the chain ``joints`` (and the root) refined from the current pose and from the
        chain mirrored in depth (``_depth_mirrored`` through the plane through the chain's top
        joint perpendicular to the ray from the source): for each joint of the chain (the collar
        aside), that joint with the chain below it, and that joint alone (the joints below keep
        their local rotations); the best kept (similarity less the prior, ``optimise``)."""
        joints = sorted(joints)
        g = self.level_views(level)[0].geometry
        top = self.binding.armature.posed_joints(self.pose, self.transl)[joints[0]]
        normal = g.ray_direction if g.parallel else top - g.source_mm
        movers = [j for j in joints if JOINT_NAMES[j].split("_", 1)[-1] != "collar"]
        subsets = []
        for k, j in enumerate(movers):
            for sub in (movers[k:], [j]):
                if sub not in subsets:
                    subsets.append(sub)
        starts = []
        for sub in subsets:
            cand = _depth_mirrored(self.binding.armature, self.pose, self.start_pose, sub, normal)
            x = np.zeros(6 + 3 * len(joints))
            for k, j in enumerate(joints):
                x[6 + 3 * k:9 + 3 * k] = (cand[3 * j:3 * j + 3] - self.pose[3 * j:3 * j + 3]) / ROT_UNIT
            starts.append(x)
        return self.optimise(level, [0] + joints, "depth_" + JOINT_NAMES[joints[0]], maxfev, starts=starts)

    def score(self, level: _Level) -> float:
        T = self.transforms(self.pose, self.transl)
        return level.score(level.render(T, self.level_views(level)))


@dataclass
class Evolve:
    """A seeded global search of a joint group (``_Problem.optimise(evolve=...)``): scipy's
    differential evolution (Storn and Price, J Global Optim 11:341-359, 1997) within +-``span_deg``
    of the current pose on each joint axis (+-``root_deg`` / ``root_mm`` for the root), clipped to
    the joint ranges, the current pose one member of a Latin hypercube population, each trial
    vector moved toward the best member and by a random difference ("current-to-best/1/bin": on a
    cost with a narrow deep optimum 30 degrees from a shallower one at the start, "best/1/bin"
    collapsed onto the start); ``maxfev`` bounds the evaluations (no early stop). Returns the best
    member (optimiser units) for Powell to refine."""

    span_deg: float
    maxfev: int
    seed: int
    popsize: int = 8
    root_deg: float = 5.0
    root_mm: float = 15.0

    def run(self, cost, joints, blo, bhi) -> np.ndarray:
        from scipy.optimize import differential_evolution

        lo, hi = [], []
        for j in joints:
            if j == 0:
                r, t = math.radians(self.root_deg) / ROT_UNIT, self.root_mm / TRANS_UNIT
                lo += [-r] * 3 + [-t] * 3
                hi += [r] * 3 + [t] * 3
            else:
                s = math.radians(self.span_deg) / ROT_UNIT
                lo += [-s] * 3
                hi += [s] * 3
        lo = np.maximum(np.array(lo), blo)
        hi = np.minimum(np.array(hi), bhi)
        # a degenerate axis (the limit at the current value) gets a sliver so scipy accepts it
        hi = np.where(hi - lo < 1e-9, lo + 1e-9, hi)
        n = len(lo)
        npop = self.popsize * n
        maxiter = max(1, self.maxfev // npop - 1)
        r = differential_evolution(cost, list(zip(lo, hi)), popsize=self.popsize, maxiter=maxiter,
                                   init="latinhypercube", x0=np.clip(np.zeros(n), lo, hi), seed=self.seed,
                                   polish=False, tol=0.0, atol=0.0, mutation=(0.5, 1.0), recombination=0.7,
                                   strategy="currenttobest1bin")
        return np.asarray(r.x, dtype=np.float64)


def _tile_sums(a: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Sums of ``a`` over the tiles that start at ``rows`` x ``cols``."""
    return np.add.reduceat(np.add.reduceat(a, rows, axis=0), cols, axis=1)


class _TiledLevel(_Level):
    """A level scored by local gradient correlation: per view, the mean over ``TILES`` x ``TILES``
    tiles of each tile's gradient correlation (tiles whose target gradients carry under
    ``TILE_MIN_ENERGY`` of the mean tile's energy left out), so that a faint structure (a forearm
    over the pelvis, a hand) weighs as much as the trunk's outline, whose edges dominate the global
    correlation. The tiles are the patches of a patch-wise gradient NCC (the "Patch-Grad-NCC" of
    Grupp et al.'s xReg 2D/3D registration library, github.com/rg2/xreg); the rest of the level is
    ``_Level``'s. With one tile the score is ``_Level``'s."""

    def __init__(self, xrays, size: int, cloud: BoneCloud, tiles: int | None = None):
        super().__init__(xrays, size, cloud)
        tiles = TILES if tiles is None else tiles
        self.tile_targets = []
        for x, v, sig in zip(xrays, self.views, self.sigma):
            gx, gy = _grad_pair(target_image(x, v.geometry.width, v.geometry.height), sig)
            h, w = gx.shape
            rows = np.unique(np.linspace(0, h, tiles + 1).astype(int)[:-1])
            cols = np.unique(np.linspace(0, w, tiles + 1).astype(int)[:-1])
            n = _tile_sums(np.ones_like(gx), rows, cols)
            comps, energy = [], 0.0
            for t in (gx, gy):
                st = _tile_sums(t, rows, cols)
                vt = _tile_sums(t * t, rows, cols) - st * st / n
                comps.append((t, st, vt))
                energy = energy + vt
            valid = energy >= TILE_MIN_ENERGY * energy.mean()
            self.tile_targets.append((rows, cols, n, comps, valid))

    def score(self, images) -> float:
        """Summed over the views: the mean of the valid tiles' gradient correlations."""
        s = 0.0
        for img, (rows, cols, n, comps, valid), sig in zip(images, self.tile_targets, self.sigma):
            if isinstance(img, tuple):
                img = img[0] if img[1] is None else img[0] + img[1]
            if not valid.any():
                continue
            acc = np.zeros(n.shape)
            for a, (t, st, vt) in zip(_grad_pair(img, sig), comps):
                sa = _tile_sums(a, rows, cols)
                va = _tile_sums(a * a, rows, cols) - sa * sa / n
                cov = _tile_sums(a * t, rows, cols) - sa * st / n
                d = va * vt
                acc += 0.5 * np.where(d > 0, cov / np.sqrt(np.where(d > 0, d, 1.0)), 0.0)
            s += float(acc[valid].mean())
        return s


def _make_level(xrays, size: int, cloud: BoneCloud, index: int = 0) -> _Level:
    """Level ``index`` scored by ``SIMILARITY`` (at the levels ``TILED_LEVELS`` with gc_tiles)."""
    if SIMILARITY not in ("gc", "gc_tiles"):
        raise CtwinError(f"unknown registration similarity {SIMILARITY!r}: gc or gc_tiles")
    if SIMILARITY == "gc_tiles" and index in TILED_LEVELS:
        return _TiledLevel(xrays, size, cloud)
    return _Level(xrays, size, cloud)


# --------------------------------------------------------------------------------------------
# region similarity: a limb group scored where its bones project
# --------------------------------------------------------------------------------------------
# A forearm or hand moves a whole-image similarity by at most 0.0014, and the trunk's soft-tissue
# outline decides between arm poses (README, "Registration accuracy"). While the groups named here
# are optimised they are scored by the gradient correlation over the region where their bones
# project (``_region_masks``, ``_RegionLevel``); the root, spine and the other groups keep the whole
# views. Names: a ``GROUPS`` name without its side ("neck", "shoulder", "elbow", "wrist", "hip", ...:
# the group's local refinements, at the levels ``REGION_LEVELS``) or "evolve_" + an
# ``EVOLVE_GROUPS`` sided kind ("evolve_arm": that global search, its region covering its span).
# The grids (``CHAIN_GRIDS``) keep the whole views. Empty: off. Measured on the reduced benchmark
# (README, "The arms scored where they are"): ("neck", "shoulder", "elbow", "wrist", "evolve_arm",
# "hip", "knee", "ankle") at levels (1, 2) with FINEST_REPEATS = 1: mean of the means 6.86 -> 6.17 mm,
# every target better by 0.2-1.5 mm, but 4 of 7 converged as before, so not the default; at all
# three levels a random pose got 2 mm worse (a group's region at 64 px is a few dozen pixels)
REGION_GROUPS: tuple = ()
REGION_LEVELS = (0, 1, 2)  # indices into ``levels``
REGION_SPAN_DEG = 15.0  # a local stage's region: where the bones go with each joint axis turned +- this
REGION_MARGIN_MM = 20.0  # each bone's projected box dilated by this (at the isocentre)
# the finest level's stages (the root with the spine, the limbs proximal to distal, the root) run
# again this many times: with the limbs scored where they are, the trunk is refitted to them
FINEST_REPEATS = 0


def _region_masks(prob, level: _Level, joints, span_deg: float, margin_mm: float) -> list | None:
    """Per view of ``level``, the pixels (bool (H, W)) where the bones moved by ``joints`` project:
    the union, over the current pose and the poses with one joint axis turned by +-``span_deg``
    (within the joint ranges), of each such bone's projected bounding box, dilated by ``margin_mm``
    at the isocentre. None where those bones project nowhere."""
    joints = [j for j in joints if j != 0]
    jset = set(joints)
    cl = level.cloud
    moving = np.array([bool(jset & s) for s in prob.sjoints]) & cl.bone
    sel = moving[cl.owner]
    if not sel.any():
        return None
    pts = cl.points[sel]
    structs, inv = np.unique(cl.owner[sel], return_inverse=True)
    poses = [prob.pose]
    span = math.radians(span_deg)
    for j in joints:
        _, lo, hi = prob._terms_of(j)
        for ax in range(3):
            for s in (-span, span):
                p = prob.pose.copy()
                p[3 * j + ax] = np.clip(p[3 * j + ax] + s, lo[ax], hi[ax])
                poses.append(p)
    views = prob.level_views(level)
    masks = [np.zeros((v.geometry.height, v.geometry.width), bool) for v in views]
    for p in poses:
        T = prob.transforms(p, prob.transl)[structs][inv]
        world = np.einsum("nij,nj->ni", T[:, :3, :3], pts) + T[:, :3, 3]
        for v, m in zip(views, masks):
            g = v.geometry
            hom = world @ v.P[:, :3].T + v.P[:, 3]
            ok = hom[:, 2] > 1e-9
            if not ok.any():
                continue
            c, r, k = hom[ok, 0] / hom[ok, 2], hom[ok, 1] / hom[ok, 2], inv[ok]
            lo_c, hi_c = np.full(len(structs), np.inf), np.full(len(structs), -np.inf)
            lo_r, hi_r = lo_c.copy(), hi_c.copy()
            np.minimum.at(lo_c, k, c)
            np.maximum.at(hi_c, k, c)
            np.minimum.at(lo_r, k, r)
            np.maximum.at(hi_r, k, r)
            mag = g.magnification
            pad = margin_mm * mag / min(g.pixel_spacing_mm)
            H, W = m.shape
            for a, b, e, f in zip(lo_c, hi_c, lo_r, hi_r):
                if not np.isfinite(a):
                    continue
                c0, c1 = max(0, int(math.floor(a - pad))), min(W, int(math.ceil(b + pad)) + 1)
                r0, r1 = max(0, int(math.floor(e - pad))), min(H, int(math.ceil(f + pad)) + 1)
                if c0 < c1 and r0 < r1:
                    m[r0:r1, c0:c1] = True
    if not any(m.any() for m in masks):
        return None
    return masks


class _RegionLevel:
    """A level scored by the gradient correlation over a region of each view (bool masks of the
    views' pixels, ``_region_masks``): per view the mean over the two gradient components of their
    normalised cross-correlation with the target's over the region's pixels, summed over the views
    whose region holds pixels; the rest (views, cloud, rendering) is the wrapped level's. With every
    pixel in the region the score is the level's (``_Level.score``; ``_TiledLevel``'s tiles are
    replaced by the region)."""

    def __init__(self, level: _Level, masks):
        self.level = level
        self.regions = []  # per view: (gradient-pixel mask, target components over it, normalised)
        for (tx, ty), m in zip(level.targets, masks):
            gm = np.asarray(m, bool)[1:-1, 1:-1]
            comps = []
            for t in (tx, ty):
                comps.append(None if t is None or gm.sum() < 2 else _normalised(t[gm]))
            self.regions.append((gm, comps))

    def __getattr__(self, name):
        return getattr(self.level, name)

    def score(self, images) -> float:
        s = 0.0
        for img, (gm, comps), sig in zip(images, self.regions, self.level.sigma):
            if all(c is None for c in comps):
                continue
            if isinstance(img, tuple):
                img = img[0] if img[1] is None else img[0] + img[1]
            for a, t in zip(_grad_pair(img, sig), comps):
                if t is None:
                    continue
                a = a[gm]
                a -= a.mean()
                n = float(np.sqrt(a @ a))
                if n > 0:
                    s += 0.5 * float(a @ t) / n
        return s


def _region_level(prob, level: _Level, li: int, name: str, joints, span_deg: float | None = None):
    """``level`` as stage ``name`` (at level index ``li``, over ``joints``) scores it: a
    ``_RegionLevel`` over the region of the moving bones where ``REGION_GROUPS`` names the stage
    (``REGION_SPAN_DEG`` or the global search's ``span_deg``), else ``level`` itself."""
    if not REGION_GROUPS or li not in REGION_LEVELS or 0 in joints:
        return level
    sided = name[len("evolve_"):] if name.startswith("evolve_") else name
    key = sided.split("_", 1)[1] if sided.startswith(("left_", "right_")) else sided
    key = "evolve_" + key if name.startswith("evolve_") else key
    if key not in REGION_GROUPS:
        return level
    masks = _region_masks(prob, level, joints, REGION_SPAN_DEG if span_deg is None else span_deg, REGION_MARGIN_MM)
    return level if masks is None else _RegionLevel(level, masks)


class _Sub:
    """One view of a level (for per-view scores)."""

    def __init__(self, level: _Level, k: int):
        self.targets, self.sigma = [level.targets[k]], [level.sigma[k]]
        self.soft_sigma, self.hard_cloud, self.soft_cloud = [level.soft_sigma[k]], level.hard_cloud, level.soft_cloud

    score = _Level.score
    compose = _Level.compose
    render = _Level.render


def _root_starts(rng, n: int) -> list:
    """Extra root starts: rotations within 10 deg and translations within 40 mm (optimiser units)."""
    out = []
    for _ in range(n):
        x = np.zeros(6)
        x[:3] = rng.uniform(-1, 1, 3) * math.radians(8.0) / ROT_UNIT
        x[3:] = rng.uniform(-1, 1, 3) * 30.0 / TRANS_UNIT
        out.append(x)
    return out


def _distinct_roots(optima, n: int) -> list:
    """Up to n (pose, transl) of the best root optima that differ by more than ``ROOT_DISTINCT``."""
    out = []
    for c, pose, transl in sorted(optima, key=lambda o: o[0]):
        far = True
        for p, t in out:
            ang = np.degrees(np.linalg.norm(_rotvec(rodrigues(pose[:3]) @ rodrigues(p[:3]).T)))
            if ang < ROOT_DISTINCT[0] and np.linalg.norm(transl - t) < ROOT_DISTINCT[1]:
                far = False
                break
        if far:
            out.append((pose, transl))
        if len(out) == n:
            break
    return out


def _chains(present) -> tuple[list, set]:
    """(name, joints, grid) of the limb chains searched jointly (``CHAIN_GRIDS``), and the set of
    their joints. The right side's grid is the left's mirrored in the sagittal plane (the rotation
    vector's y and z negated)."""
    out, used = [], set()
    for side in ("left", "right"):
        for kind, (grid, jnames) in CHAIN_GRIDS.items():
            js = [JOINT_INDEX[f"{side}_{n}"] for n in jnames if JOINT_INDEX[f"{side}_{n}"] in present]
            g = [(JOINT_INDEX[f"{side}_{n}"], ax,
                  np.radians(offs) * (-1.0 if side == "right" and ax in (1, 2) else 1.0))
                 for n, ax, offs in grid if JOINT_INDEX[f"{side}_{n}"] in js]
            if g:
                out.append((f"{side}_{kind}", js, g))
                used |= set(js)
    return out, used


def register(twin, xrays, *, init_pose=None, init_transl_mm=None, levels=LEVELS, articulated: bool = True,
             refine_geometry: bool = False, root_starts: int = 8, seed: int = 0, effort: float = 1.0,
             cloud: BoneCloud | None = None) -> Registration:
    """Estimate the twin's pose from X-ray images (``XRay`` list). See the module docstring."""
    if not xrays:
        raise CtwinError("registration needs at least one X-ray image")
    t_start = time.perf_counter()
    cloud = bone_cloud(twin) if cloud is None else cloud
    pose0 = twin.pose0 if init_pose is None else np.asarray(init_pose, dtype=np.float64).reshape(72)
    transl0 = twin.transl0_mm if init_transl_mm is None else np.asarray(init_transl_mm, dtype=np.float64).reshape(3)
    check_in_view(twin, cloud, xrays, pose0, transl0)
    prob = _Problem(twin, cloud, xrays, pose0, transl0, articulated)
    rng = np.random.default_rng(seed)
    present = set()
    for s in prob.sjoints:
        present |= s
    groups = [(n, [JOINT_INDEX[j] for j in js if JOINT_INDEX[j] in present]) for n, js in GROUPS]
    groups = [(n, js) for n, js in groups if js]
    stages = []
    spine = [(n, js) for n, js in groups if n == "spine"]
    limbs = [(n, js) for n, js in groups if n != "spine"]
    chains, in_chain = _chains(present)
    distal = [(n, js) for n, js in limbs if not set(js) <= in_chain]
    legs = [j for n, js, g in chains if n.endswith("_leg") for j in js]
    lv_objs = [_make_level(xrays, int(size), cloud, li) for li, size in enumerate(levels)]
    mirror_levels = {li % len(levels) for li in DEPTH_MIRROR_LEVELS if -len(levels) <= li < len(levels)}

    def level_plan(li, root_first=True):
        """(name, joints, search, grid) per stage; the root of the spine group is re-estimated
        with it."""
        plan = [("root", [0], False, None)] if (root_first or li > 0 or not articulated) else []
        if li == 0 and refine_geometry and len(xrays) > 1:
            plan.append(("geometry", None, False, None))
        if articulated:
            if li == 0:  # the limb chains on their grids and the distal groups searched, the root
                # again (the limbs no longer pull it), the limbs refined, the root, then the spine
                plan += [(n, js, False, g) for n, js, g in chains]
                plan += [(n, js, True, None) for n, js in distal]
                if JOINT_REFINE:
                    plan.append(("root_legs", [0] + legs, False, None))
                else:
                    plan.append(("root_all", [0], False, None))
                # the grids again: a limb's grid was scored with the other limbs still at the
                # start, and the other leg overlaps it in a lateral view
                plan += [(n, js, False, g) for n, js, g in chains]
                plan += [(n, js, False, None) for n, js in distal]
                plan += [("swap", side, False, None) for side in SWAP_GROUPS]
                plan.append(("root_all", [0], False, None))
            if len(xrays) < 2 and li in mirror_levels:
                plan += [("depth", js, False, None) for n, js, g in chains]
            plan += [("spine", [0] + js, False, None) for n, js in spine]
            plan += [(n, js, False, None) for n, js in limbs]
            if li == len(levels) - 1:
                plan.append(("root_final", [0], False, None))
        return plan

    done = [0]

    def evolve_plan(li):
        """(name, joints, span, evaluations) of level li's global searches (``EVOLVE_GROUPS``)."""
        out = []
        if not articulated or li not in EVOLVE_LEVELS or len(xrays) < 2:
            return out
        for kind, names, span, fev in EVOLVE_GROUPS.get(li, ()):
            if kind in _SIDED:
                for side in ("left", "right"):
                    js = [JOINT_INDEX[f"{side}_{n}"] for n in names if JOINT_INDEX[f"{side}_{n}"] in present]
                    if js:
                        out.append((f"evolve_{side}_{kind}", js, span, fev))
            else:
                js = [JOINT_INDEX[n] for n in names if JOINT_INDEX[n] in present]
                if js:
                    out.append((f"evolve_{kind}", [0] + js, span, fev))
        return out

    n_total = (sum(len(level_plan(li)) for li in range(1, len(levels)))
               + (ROOT_HYPOTHESES if articulated else 1) * len(level_plan(0))
               + (len(level_plan(0, False)) if articulated and BOTH_ORDERS else 0)
               + sum(len(evolve_plan(li)) for li in range(len(levels)))
               + (FINEST_REPEATS * len(level_plan(len(levels) - 1)) if articulated else 0))

    def finished(level, name):
        """Count the stage just appended and report it (progress line; debug print); a stage scored
        over a region (``_RegionLevel``) is marked, its similarities being the region's."""
        done[0] += 1
        st = stages[-1]
        if isinstance(level, _RegionLevel):
            st["region"] = True
        if _DEBUG:
            print(name, level.size, np.round(prob.pose[:6], 3), np.round(prob.transl, 1), round(st["before"], 4),
                  round(st["after"], 4), st["evals"], round(st["seconds"], 1))
        report(f"register: {level.size} px, {name}: similarity {st['after']:.4f}", min(1.0, done[0] / n_total))

    def run_evolve(li, name, joints, span, fev):
        level = lv_objs[li]
        prob.root_range = (ROOT_RANGE_DEG, ROOT_RANGE_MM) if li == 0 else (ROOT_RANGE_DEG / 2, ROOT_RANGE_MM / 2)
        ev = Evolve(span, int(effort * fev), int(rng.integers(2 ** 31)))
        level = _region_level(prob, level, li, name, joints, span)
        stages.append(prob.optimise(level, joints, name, int(effort * 120 * max(1, len(joints) // 2)), evolve=ev))
        finished(level, name)

    def run_stage(li, name, joints, search, grid=None):
        level = lv_objs[li]
        prob.root_range = (ROOT_RANGE_DEG, ROOT_RANGE_MM) if li == 0 else (ROOT_RANGE_DEG / 2, ROOT_RANGE_MM / 2)
        if name == "swap":
            present_names = [n for n in joints if JOINT_INDEX[f"left_{n}"] in present
                             and JOINT_INDEX[f"right_{n}"] in present]
            if present_names:
                stages.append(prob.swap_sides(level, present_names, int(effort * 1000)))
                if _DEBUG:
                    print(stages[-1])
            return
        if name == "depth":
            stages.append(prob.mirror_depth(level, joints, int(effort * 120 * max(1, len(joints)))))
            finished(level, stages[-1]["stage"])
            return
        if name == "geometry":
            for v in range(1, len(xrays)):
                stages.append(prob.refine_view(level, v, int(effort * 300)))
            return
        if name == "root_legs":
            fev = int(effort * 1500)
            starts = None
        elif name in ("root", "root_all", "root_final"):
            fev = int(effort * (400 if li == 0 else 200))
            starts = _root_starts(rng, root_starts) if li == 0 and name == "root" and root_starts > 0 else None
        else:
            fev = int(effort * (300 if name == "spine" else 120 * max(1, len(joints) // 2)))
            starts = None
        level = level if grid is not None else _region_level(prob, level, li, name, joints)
        stages.append(prob.optimise(level, joints, name, fev, starts=starts, search=search, grid=grid))
        finished(level, name)

    for li in range(len(levels)):
        if li == 0 and articulated:
            # two orders at the coarsest level, the better kept: the rigid root first (right when
            # the limbs are near the start), or the limbs first from the start's root (right when a
            # strongly bent limb pulls the rigid fit away)
            start = (prob.pose.copy(), prob.transl.copy(), [t.copy() for t in prob.view_T])
            results = []
            orders = (("root_first", True), ("limbs_first", False)) if BOTH_ORDERS else (("root_first", True),)
            for order, root_first in orders:
                prob.pose, prob.transl, prob.view_T = start[0].copy(), start[1].copy(), [t.copy() for t in start[2]]
                n0 = len(stages)
                plan = level_plan(0, root_first)
                hyps = [None]
                if root_first and plan[0][0] == "root":
                    run_stage(0, *plan[0])
                    plan = plan[1:]
                    hyps = _distinct_roots(prob.local_optima, ROOT_HYPOTHESES)
                view_T = [t.copy() for t in prob.view_T]
                for hi, hyp in enumerate(hyps):
                    if hyp is not None:
                        prob.pose, prob.transl = hyp[0].copy(), hyp[1].copy()
                        prob.view_T = [t.copy() for t in view_T]
                    for st in plan:
                        run_stage(0, *st)
                    name = order if len(hyps) == 1 else f"{order}_{hi}"
                    results.append((prob.score(lv_objs[0]), prob.pose.copy(), prob.transl.copy(),
                                    [t.copy() for t in prob.view_T], name))
                for st in stages[n0:]:
                    st["order"] = order
            best = max(results, key=lambda r: r[0])
            prob.pose, prob.transl, prob.view_T = best[1], best[2], best[3]
            stages.append({"stage": "order", "level": lv_objs[0].size, "chosen": best[4],
                           "scores": {r[4]: r[0] for r in results}})
            for st in evolve_plan(0):
                run_evolve(0, *st)
            continue
        for st in evolve_plan(li):
            run_evolve(li, *st)
        for st in level_plan(li):
            run_stage(li, *st)
        for _ in range(FINEST_REPEATS if li == len(levels) - 1 and articulated else 0):
            for st in level_plan(li):
                run_stage(li, *st)
    if POSED_REFINE and articulated:
        stages.append(posed_stage(prob, lv_objs, effort))
        finished(lv_objs[-1], "posed")
    final = prob.score(lv_objs[-1])
    geoms = [v.geometry.transformed(T) if not np.allclose(T, np.eye(4)) else x.geometry
             for v, T, x in zip([_View.of(x.geometry) for x in xrays], prob.view_T, xrays)]
    joints = twin.binding.armature.posed_joints(prob.pose, prob.transl)
    return Registration(prob.pose, prob.transl, joints, final, stages, time.perf_counter() - t_start,
                        geoms, np.asarray(pose0, dtype=np.float64), np.asarray(transl0, dtype=np.float64))


def coarse_articulated(art, factor: int):
    """The articulated CT pooled ``factor`` x ``factor`` x ``factor`` (cached on ``art``): the soft
    tissue and each part's crop averaged over the blocks (HU; a part's blocks read the soft tissue
    where they reach past its crop), a part's mask set in every block it touches (so a block a bone
    covers holds the CT's own mean there, the part's crop being the CT),
    the weight field unchanged. Coarse voxel k covers fine voxels f k .. f k + f - 1, so with the
    weight grid's spacing (3 fine voxels for twins) the two lattices coincide. For scoring poses at
    coarse image sizes: at the acquisition pose its DRR is the pooled CT's."""
    f = int(factor)
    if f <= 1:
        return art
    hit = art._cache.get(("coarse", f))
    if hit is not None:
        return hit
    A = np.asarray(art.affine, dtype=np.float64)
    S = np.diag([float(f), float(f), float(f), 1.0])
    S[:3, 3] = 0.5 * (f - 1)
    Ac = A @ S
    # the inverse warp reads tissue occupancy per weight cell as whole coarse voxels: the weight
    # lattice must be one of the coarse lattice's (an integer multiple of its spacing, a node on it)
    ratio = np.linalg.norm(art.weight_affine[:3, :3], axis=0) / np.linalg.norm(Ac[:3, :3], axis=0)
    node = (np.linalg.inv(Ac) @ art.weight_affine[:, 3])[:3]
    if not (np.allclose(ratio, np.rint(ratio), atol=1e-6) and (np.rint(ratio) >= 1).all()
            and np.allclose(node, np.rint(node), atol=1e-6)):
        raise CtwinError(f"cannot pool the articulated CT by {f}: its weight grid is not on the pooled lattice")

    def blocks(a, lo, mode):
        lo = np.asarray(lo, np.int64)
        hi = (-(np.asarray(a.shape) + lo)) % f
        a = np.pad(a, [(int(x), int(y)) for x, y in zip(lo, hi)], mode=mode)
        n = np.asarray(a.shape) // f
        return a.reshape(n[0], f, n[1], f, n[2], f)

    def cast(mean, like):
        return (np.rint(mean) if np.issubdtype(like.dtype, np.integer) else mean).astype(like.dtype)

    soft_f = np.pad(np.asarray(art.soft, np.float32), [(0, int(-n % f)) for n in art.soft.shape], mode="edge")
    soft = cast(blocks(soft_f, (0, 0, 0), "edge").mean(axis=(1, 3, 5)), art.soft)
    parts = []
    for p in art.parts:
        off = p.offset_on(A)
        base = (off // f) * f
        lo = off - base
        shape = np.asarray(p.data.shape)
        ext = -(-(lo + shape) // f) * f
        # the blocks the crop touches: the crop's voxels, and beyond it the soft tissue's (the CT there)
        d = soft_f[tuple(slice(int(b), int(b + e)) for b, e in zip(base, ext))].copy()
        inner = tuple(slice(int(a), int(a + n)) for a, n in zip(lo, shape))
        d[inner] = p.data
        m = np.zeros(d.shape, bool)
        m[inner] = np.asarray(p.mask) > 0
        d, m = blocks(d, (0, 0, 0), "edge").mean(axis=(1, 3, 5)), blocks(m, (0, 0, 0), "constant").any(axis=(1, 3, 5))
        aff = Ac.copy()
        aff[:3, 3] = Ac[:3, :3] @ (base // f) + Ac[:3, 3]
        parts.append(PlacedVolume(cast(d, np.asarray(p.data)), m.astype(np.uint8), aff, p.name, p.kind, p.bone,
                                  p.joint))
    out = ArticulatedCT(Ac, soft, parts, art.weights, art.weight_affine, art.weight_joints, art.joints_rest_mm,
                        dict(art.binding), dict(art.params))
    art._cache[("coarse", f)] = out
    return out


def weight_cell_voxels(art) -> int:
    """The articulated CT's weight-grid cell in CT voxels (the largest factor ``coarse_articulated``
    pools by on every axis)."""
    r = np.linalg.norm(art.weight_affine[:3, :3], axis=0) / np.linalg.norm(np.asarray(art.affine)[:3, :3], axis=0)
    return max(1, int(np.rint(r).min()))


def posed_drrs(twin, pose, transl, geometries, coarsen: int | None = None, warp_mm: float | None = None) -> list:
    """The twin's posed DRRs (line integrals, float64) at ``geometries``: the articulated CT pooled by
    ``coarsen`` (default ``POSED_COARSEN``, None: ``weight_cell_voxels``) posed (the soft tissue
    through the inverse skinning warp with nodes every ``warp_mm``, default ``POSED_WARP_MM``, the
    bones rigid), composed once and rendered per geometry on the CPU."""
    coarsen = POSED_COARSEN if coarsen is None else coarsen
    warp_mm = POSED_WARP_MM if warp_mm is None else warp_mm
    art = twin.articulated
    art = coarse_articulated(art, weight_cell_voxels(art) if coarsen is None else coarsen)
    jd = twin.joint_deltas(pose, transl)
    scene = posed_scene(art, bone_deltas(twin.binding, pose, transl, jd), jd, warp_spacing_mm=warp_mm,
                        device="cpu")
    return [np.asarray(render_posed(scene, g, device="cpu"), dtype=np.float64) for g in geometries]


def compass_search(cost, x0, steps, maxfev: int, shrink: float = 0.5, min_scale: float = 0.125):
    """Compass (coordinate pattern) search (Kolda, Lewis and Torczon, SIAM Review 45(3):385-482,
    2003): each coordinate tried at + then - its step, a better point taken at once; after a sweep
    without a better point the steps shrink by ``shrink``, until they reach ``min_scale`` of the
    first or ``maxfev`` evaluations are spent.
    Returns (x, cost(x), evaluations)."""
    x = np.asarray(x0, dtype=np.float64).copy()
    steps = np.asarray(steps, dtype=np.float64)
    fx = cost(x)
    n = 1
    scale = 1.0
    while n < maxfev and scale >= min_scale - 1e-12:
        improved = False
        for k in range(len(x)):
            for sgn in (1.0, -1.0):
                if n >= maxfev:
                    break
                y = x.copy()
                y[k] += sgn * scale * steps[k]
                fy = cost(y)
                n += 1
                if fy < fx:
                    x, fx, improved = y, fy, True
                    break
        if not improved:
            scale *= shrink
    return x, fx, n


def decoupled_rotation(pose, j: int, dR: np.ndarray) -> np.ndarray:
    """The pose with joint j's local rotation R_j turned to R_j dR and each child's R_c to dR^T R_c:
    joint j's world orientation turns by dR (about its own axes), its children's stay as they were
    (their world rotation is the parents' product times their own)."""
    pose = np.array(pose, dtype=np.float64).reshape(72)
    pose[3 * j:3 * j + 3] = rotation_to_rotvec(rodrigues(pose[3 * j:3 * j + 3]) @ dR)
    for c in np.flatnonzero(PARENTS == j):
        pose[3 * c:3 * c + 3] = rotation_to_rotvec(dR.T @ rodrigues(pose[3 * c:3 * c + 3]))
    return pose


def posed_stage(prob: "_Problem", levels, effort: float = 1.0) -> dict:
    """The registration's last stage (``POSED_REFINE``): ``posed_refine`` at the level nearest
    ``POSED_SIZE`` px, the root within half its range, ``effort`` x ``POSED_MAXFEV`` posed DRRs."""
    level = levels[int(np.argmin([abs(lv.size - POSED_SIZE) for lv in levels]))]
    prob.root_range = (ROOT_RANGE_DEG / 2, ROOT_RANGE_MM / 2)
    return posed_refine(prob, level, max(1, int(effort * POSED_MAXFEV)))


def posed_refine(prob: "_Problem", level: _Level, maxfev: int | None = None, joints=None,
                 coarsen: int | None = None, warp_mm: float | None = None, decoupled=None) -> dict:
    """Refine ``prob``'s pose with the twin's posed DRR as the moving image (``posed_drrs``) and the
    level's similarity (its targets, blur and views), the prior and joint ranges as in
    ``_Problem.optimise``; a compass search over the given joints' axes (the root: rotation and
    translation; axes with a tight prior left out) and, for the ``decoupled`` joints (default
    ``POSED_DECOUPLED``), each axis rotated with the children counter-rotated so that their world
    orientations stay; ``maxfev`` posed DRRs. Taken only if its cost (prior less similarity) is
    lower than the start's."""
    t0 = time.perf_counter()
    maxfev = POSED_MAXFEV if maxfev is None else maxfev
    js = [JOINT_INDEX[n] for n in (POSED_JOINTS if joints is None else joints)]
    js = [j for j in js if j == 0 or any(j in s for s in prob.sjoints)]
    views = prob.level_views(level)
    geoms = [v.geometry for v in views]
    base_pose, base_transl = prob.pose.copy(), prob.transl.copy()
    slots, steps = [], []  # (index into _apply's x, step in its units)
    k = 0
    for j in js:
        if j == 0:
            slots += list(range(6))
            steps += [math.radians(POSED_STEP_DEG) / ROT_UNIT] * 3 + [POSED_STEP_MM / TRANS_UNIT] * 3
            k += 6
            continue
        sig = PRIOR_AXIS_SIGMA_DEG.get(JOINT_NAMES[j], (None, None, None))
        for ax in range(3):
            if sig[ax] is None or sig[ax] > 10.0:
                slots.append(k + ax)
                steps.append(math.radians(POSED_STEP_DEG) / ROT_UNIT)
        k += 3
    nparam = k
    blo, bhi = prob.step_bounds(js, base_pose)
    # decoupled directions: (joint, axis, its children), appended after the slots
    dec = [(JOINT_INDEX[n], ax, [int(c) for c in np.flatnonzero(PARENTS == JOINT_INDEX[n])])
           for n in (POSED_DECOUPLED if decoupled is None else decoupled) for ax in range(3)]
    steps += [math.radians(POSED_STEP_DEG) / ROT_UNIT] * len(dec)
    pen_js = sorted(set(js) | {j for j, _, _ in dec} | {c for _, _, cs in dec for c in cs})
    ns = len(slots)
    slots = np.asarray(slots, np.intp)
    sims, memo = {}, {}

    def cost(z):
        key = z.tobytes()
        if key in memo:
            return memo[key]
        x = np.zeros(nparam)
        x[slots] = z[:ns]
        xc = np.clip(x, blo, bhi)
        pose, transl = prob._apply(js, xc, base_pose, base_transl)
        for (j, ax, cs), v in zip(dec, z[ns:]):
            if v != 0.0:
                pose = decoupled_rotation(pose, j, rodrigues(np.eye(3)[ax] * (v * ROT_UNIT)))
        sim = level.score(posed_drrs(prob.twin, pose, transl, geoms, coarsen, warp_mm))
        sims[key] = sim
        memo[key] = float(np.sum((x - xc) ** 2)) + prob._penalty(pose, pen_js) - sim
        poses[key] = (pose, transl)
        if len(memo) % 50 == 0:  # about 15 s of work on the 2-core CPU
            report(f"register: {level.size} px, posed DRR refinement: {len(memo)} of {maxfev} evaluations")
        return memo[key]

    poses = {}
    z0 = np.zeros(len(steps))
    c0 = cost(z0)
    before = sims[z0.tobytes()]
    z, c, n = compass_search(cost, z0, steps, maxfev)
    after = before
    if c < c0:
        prob.pose, prob.transl = poses[z.tobytes()]
        after = sims[z.tobytes()]
    prob.evals += len(memo)
    return {"stage": "posed", "level": level.size, "params": len(steps), "evals": len(memo), "before": before,
            "after": after, "seconds": time.perf_counter() - t0}


def check_in_view(twin, cloud: BoneCloud, xrays, pose, transl, min_fraction: float = 0.05) -> None:
    """One-line errors for a view that misses the body or sees no bone of the twin."""
    T = _Problem(twin, cloud, [], pose, transl, True).transforms(pose, transl)
    sel = cloud.bone[cloud.owner]
    To = T[cloud.owner[sel]]
    pts = np.einsum("nij,nj->ni", To[:, :3, :3], cloud.points[sel]) + To[:, :3, 3]
    wb = cloud.weight[sel]
    for x in xrays:
        g = x.geometry
        P = g.projection_matrix()
        h = np.c_[pts, np.ones(len(pts))] @ P.T
        front = h[:, 2] > 1e-6
        cr = h[:, :2] / np.where(front, h[:, 2], 1.0)[:, None]
        inside = front & (cr[:, 0] >= 0) & (cr[:, 0] <= g.width - 1) & (cr[:, 1] >= 0) & (cr[:, 1] <= g.height - 1)
        frac = float((wb * inside).sum() / wb.sum())
        if frac < min_fraction:
            raise CtwinError(f"{x.name}: the geometry misses the twin's bones ({100 * frac:.1f} % of the bone "
                             "projects onto the detector at the start pose); check the sidecar or --init")


# --------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------
def registration_record(twin, reg: Registration, xrays) -> dict:
    """registration.json: a pose file (SPEC 4) on the twin's own skeleton, plus the run's record."""
    rest = np.asarray(twin.binding.armature.joints_rest_mm, dtype=np.float64)
    return {
        "pose": reg.pose.tolist(),
        "transl": reg.transl_mm.tolist(),
        "joints": np.asarray(reg.joints_mm).tolist(),
        "rest_joints": (rest - rest[0]).tolist(),
        "kintree_parents": [int(p) for p in PARENTS],
        "similarity": reg.similarity,
        "init_pose": reg.init_pose.tolist(),
        "init_transl": reg.init_transl_mm.tolist(),
        "images": [x.path for x in xrays],
        "geometries": [g.to_sidecar(value=x.value) for g, x in zip(reg.geometries, xrays)],
        "seconds": reg.seconds,
    }


def contour_overlay(xray: XRay, bone_img_before: np.ndarray, bone_img_after: np.ndarray) -> np.ndarray:
    """RGB uint8, three panels side by side: the input image (log display), the projected bone
    contours at the start (red) and after registration (green) on it."""
    li = np.maximum(xray.image, 0.0)
    body = li > 0.05 * float(li.max()) if li.max() > 0 else np.ones(li.shape, bool)
    lo, hi = np.percentile(li[body], [1, 99.8])
    gray = np.clip((li - lo) / max(hi - lo, 1e-9), 0, 1) ** 0.7 * body
    rgb = np.repeat((gray * 255).astype(np.uint8)[..., None], 3, axis=2)

    def edge(b):
        s = gaussian_filter(b, 0.7)
        pos = s[s > 0]
        if pos.size == 0:
            return np.zeros(b.shape, bool)
        m = s > 0.3 * float(np.percentile(pos, 95))
        return m & ~binary_erosion(m)

    panels = [rgb]
    for img, col in ((bone_img_before, (255, 40, 40)), (bone_img_after, (40, 255, 40))):
        p = rgb.copy()
        p[edge(img)] = col
        panels.append(p)
    # crop to the body (and the contours) with a margin
    occ = body | edge(bone_img_before) | edge(bone_img_after)
    if occ.any():
        rr, cc = np.flatnonzero(occ.any(1)), np.flatnonzero(occ.any(0))
        m = max(4, int(0.03 * max(gray.shape)))
        r0, r1 = max(0, rr[0] - m), min(gray.shape[0], rr[-1] + m + 1)
        c0, c1 = max(0, cc[0] - m), min(gray.shape[1], cc[-1] + m + 1)
        panels = [p[r0:r1, c0:c1] for p in panels]
    gap = np.full((panels[0].shape[0], 4, 3), 255, np.uint8)
    return np.concatenate([panels[0], gap, panels[1], gap, panels[2]], axis=1)


def write_png(path, rgb: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(rgb)).save(tmp, format="PNG")


def write_outputs(twin, reg: Registration, xrays, out_dir, cloud: BoneCloud | None = None) -> dict:
    """registration.json, report.json and overlay_<image>.png (before/after) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cloud = bone_cloud(twin) if cloud is None else cloud
    rec = registration_record(twin, reg, xrays)
    write_json(out / "registration.json", rec)
    overlays = []
    for x, g in zip(xrays, reg.geometries):
        gx = x.geometry
        if max(gx.size_px) > 1024:
            gx = gx.with_size(*(int(round(s * 1024 / max(gx.size_px))) for s in gx.size_px))
        img = x if gx is x.geometry else XRay(x.name, _resample(x.image, gx.width, gx.height), gx, x.value, x.path)
        gafter = g if gx is x.geometry else g.with_size(gx.width, gx.height)
        b = bone_drr(twin, gx, reg.init_pose, reg.init_transl_mm, cloud)
        a = bone_drr(twin, gafter, reg.pose, reg.transl_mm, cloud)
        name = f"overlay_{x.name}.png"
        write_png(out / name, contour_overlay(img, b, a))
        overlays.append(name)
    rep = {"similarity": "gradient correlation, summed over views (Penney et al. 1998)",
           "final_similarity": reg.similarity, "seconds": reg.seconds, "stages": reg.stages,
           "overlays": overlays,
           "legend": "panels: input; bone contours at the start pose (red); after registration (green)"}
    write_json(out / "report.json", rep)
    return rec
