"""The DRR engine's volume providers for twins and for the panel workflow (``render.scene_volumes``
asks them per frame, first non-None answer wins; ``render.register`` installs them).

- ``twin_provider``: a scene with a twin directory (``scene.ctwin.twin_dir``, e.g. a twin's own
  ``twin.blend``) renders that twin's articulated CT at the armature's pose in the frame.
- ``session_provider``: the panel workflow with no twin directory renders the CT and segmentation
  of "Import CT Anatomy" (or, after "Import Anatomy Meshes", the anatomy voxelised: mesh mode),
  decomposed once for the rig of "Build Rig" and posed by the evaluated armature.
"""
from __future__ import annotations

import os

import bpy
import numpy as np

from ..blender.data import MM_TO_M
from ..blender.properties import abspath
from ..blender.scene import anatomy_meshes, anatomy_objects, twin_armature_object
from ..core.errors import CtwinError
from ..core.body.skeleton import JOINT_NAMES
from ..rig.armature import armature_pose
from . import scene_volumes

# The twin, decomposition, reader and voxeliser modules (numba, scipy) are imported inside the
# providers: Blender registers the extension at every start, and they load on the first render.


def _twin(scene):
    """The scene's twin (resident while its twin.json is unchanged), or None without a twin directory."""
    from ..core.twin.twin import load_twin

    settings = getattr(scene, "ctwin", None)
    if settings is None or not settings.twin_dir:
        return None
    d = os.path.realpath(bpy.path.abspath(settings.twin_dir))
    meta = os.path.join(d, "twin.json")
    if not os.path.isfile(meta):
        raise CtwinError(f"the scene's twin directory {d} has no twin.json")
    return scene_volumes.cached(("twin", d, os.stat(meta).st_mtime_ns), lambda: load_twin(d))


def _device(scene) -> str:
    """The scene's DRR device (``scene.ctwin.device``), resolved: posing runs where the render runs."""
    from ..core.drr.projector import resolve_device

    return resolve_device(scene.ctwin.device)


def twin_provider(scene, frame):
    """Posed projector scene of the twin at the armature's current pose, or None without a twin."""
    twin = _twin(scene)
    if twin is None:
        return None
    arm = twin_armature_object(scene)
    if arm is not None:
        pose, transl = armature_pose(scene_volumes.evaluated(arm))
    else:
        pose, transl = twin.pose0, None
    return twin.posed_scene(pose, transl, _device(scene))


def twin_labels(scene, mapping: dict):
    """Label materials of the twin's own labels (``core.twin.label_materials.LabelOverrides``, as
    ``ctwin render --twin ... --label-material`` builds them), resident per twin and mapping."""
    from ..core.twin.label_materials import LabelOverrides

    twin = _twin(scene)
    key = ("twin-labels", str(twin.path), scene_volumes.mapping_key(mapping))

    def build():
        scene_volumes.drop("twin-labels")  # one set of overrides stays resident
        return LabelOverrides(twin.articulated, twin.labelmap, twin.names, mapping)

    return scene_volumes.check_applied(scene_volumes.cached(key, build), "the twin")


twin_provider.labels = twin_labels


def _evaluated_bone_deltas(arm_obj) -> dict:
    """{bone: 4x4} rest -> posed world transforms (mm) of every bone of the evaluated armature."""
    ev = scene_volumes.evaluated(arm_obj)
    mw = np.array(arm_obj.matrix_world, dtype=np.float64)
    out = {}
    for pb in ev.pose.bones:
        posed = mw @ np.array(pb.matrix, dtype=np.float64)
        rest = mw @ np.array(pb.bone.matrix_local, dtype=np.float64)
        d = posed @ np.linalg.inv(rest)
        d[:3, 3] /= MM_TO_M
        out[pb.name] = d
    return out


def scene_mesh_volume(objects, spacing: float = 3.0):
    """Mesh mode in a scene: the anatomy objects (LPS mm) voxelised into a synthetic CT and
    labelmap (``core.meshes.mesh_volume``, each structure's HU by its kind)."""
    from ..core.meshes.mesh_volume import hu_table, prepare_mesh, voxelise_meshes

    meshes = {n: prepare_mesh(m) for n, m in anatomy_meshes(objects).items()}
    return voxelise_meshes(meshes, hu_table(meshes), spacing)


def _session(scene):
    """The panel workflow's decomposed CT, resident: {"art", "labelmap", "names", "table", "arm"},
    or None when the scene has a twin directory, no rig or nothing to decompose."""
    from ..core.twin.articulated import prepare_articulated
    from ..core.volumes.ct import load_ct
    from ..core.volumes.labels import joint_for_label
    from ..core.volumes.segmentation import load_segmentation

    settings = getattr(scene, "ctwin", None)
    if settings is None or settings.twin_dir:
        return None  # twin_provider renders twins with a directory
    ct_path, seg_path = abspath(settings.ct_path), abspath(settings.seg_path)
    arm = twin_armature_object(scene)
    if arm is None or arm.get("ctwin_binding") is None:
        return None
    table = dict(arm["ctwin_binding"].to_dict() if hasattr(arm["ctwin_binding"], "to_dict") else arm["ctwin_binding"])
    joints = np.asarray(arm["ctwin_joints_mm"], dtype=np.float64).reshape(-1, 3)
    if ct_path and seg_path:
        if not (os.path.exists(ct_path) and os.path.exists(seg_path)):
            return None
        source = (os.path.realpath(ct_path), os.path.realpath(seg_path))

        def volumes():
            ct = load_ct(ct_path)
            labelmap, names = load_segmentation(seg_path, ct)
            return ct, labelmap, names
    else:
        objects = anatomy_objects()
        if not any(o.name == "skin" for o in objects):
            return None
        source = ("meshes",) + tuple(sorted((o.name, len(o.data.vertices)) for o in objects))

        def volumes():
            mv = scene_mesh_volume(objects)
            return mv.ct, mv.labelmap, mv.names
    key = ("session",) + source + (arm.name, hash(joints.round(3).tobytes()), tuple(sorted(table.items())))

    def build():
        ct, labelmap, names = volumes()
        joint_of = {label: bone if bone in JOINT_NAMES else joint_for_label(label)
                    for label, bone in table.items() if bone != "smooth"}
        return {"art": prepare_articulated(ct, labelmap, names, joint_of, joints), "labelmap": labelmap,
                "names": names, "key": key}

    return {**scene_volumes.cached(key, build), "table": table, "arm": arm}


def session_provider(scene, frame):
    """The panel workflow's twin (no twin directory): the CT and segmentation stored by "Import CT
    Anatomy" -- or, after "Import Anatomy Meshes" with no CT, the anatomy objects voxelised
    (mesh mode, ``scene_mesh_volume``) -- decomposed once for the rig made by "Build Rig", posed by
    the evaluated armature."""
    from ..core.twin.articulated import posed_scene
    from ..core.twin.twin import WARP_SPACING_MM

    sess = _session(scene)
    if sess is None:
        return None
    deltas = _evaluated_bone_deltas(sess["arm"])
    bone_deltas = {label: deltas[bone] for label, bone in sess["table"].items() if bone in deltas}
    joint_deltas = np.stack([deltas[n] for n in JOINT_NAMES])
    return posed_scene(sess["art"], bone_deltas, joint_deltas, warp_spacing_mm=WARP_SPACING_MM,
                       device=_device(scene))


def session_labels(scene, mapping: dict):
    """Label materials of the panel workflow's segmentation (or mesh mode's structures), carried
    through the rig's poses like a twin's (``core.twin.label_materials.LabelOverrides``)."""
    from ..core.twin.label_materials import LabelOverrides

    sess = _session(scene)
    key = ("session-labels", sess["key"], scene_volumes.mapping_key(mapping))

    def build():
        scene_volumes.drop("session-labels")  # one set of overrides stays resident
        return LabelOverrides(sess["art"], sess["labelmap"], sess["names"], mapping)

    return scene_volumes.check_applied(scene_volumes.cached(key, build), "the segmentation")


session_provider.labels = session_labels


PROVIDERS = (session_provider, twin_provider)  # registered in this order; the last one is asked first
