"""Blender armature of the twin (thin layer over ``core.rig.armature`` / ``core.rig.binding``).

- ``create_armature(binding)``: an armature object at the world origin (Blender world = LPS
  metres), rest = the acquisition pose. SMPL's 24 bones (heads at the fitted joints, rolls from
  ``core.rig.armature``: ``EditBone.align_roll`` to the core frame's Z), parented as SMPL's tree,
  not connected; plus one bone per vertebra (e.g. ``vertebrae_L3``), parented to its lower
  joint's bone (so it follows ``D_lower``), with a hidden non-deforming helper bone of the same
  rest placement parented to the upper joint's bone (``ctwin_upper_<vertebra>``, following
  ``D_upper``) and a Copy Transforms constraint to that helper at influence w. Blender blends a
  constraint by decomposing both matrices, lerping the location (the bone head = the
  vertebra's anchor) and slerping the rotation, which is exactly
  ``core.rig.pose.vertebra_transform``, so user keyframes on the SMPL bones bend the spine too. The twin's p0, t0 and J0 are stored on the object (``ctwin_pose0``,
  ``ctwin_transl0_mm``, ``ctwin_joints_mm``) and the binding table as ``ctwin_binding``.
- ``bind_meshes(arm_obj, objects, binding)``: parents meshes to the armature with an Armature
  modifier and vertex groups set in bulk (rigid: one group, weight 1; soft: the top-4 weights).
- ``set_pose(arm_obj, pose, transl_mm)`` / ``armature_pose(arm_obj)`` /
  ``armature_pose_vector(arm_obj) -> (72,)``: pose bones <-> SMPL pose vectors.
"""
from __future__ import annotations

import bpy
import numpy as np
from mathutils import Vector

from ..blender import data as bl_data
from ..core.rig.armature import Armature, build_armature
from ..core.rig.binding import Binding
from ..core.errors import CtwinError
from ..core.body.skeleton import JOINT_NAMES, MM_TO_M, N_JOINTS, PARENTS


def _matrix3_to_quat(m: np.ndarray) -> np.ndarray:
    """Rotation matrices (..., 3, 3) -> quaternions (..., 4) as Blender's (w, x, y, z)."""
    from scipy.spatial.transform import Rotation

    flat = np.asarray(m, dtype=np.float64).reshape(-1, 3, 3)
    q = Rotation.from_matrix(flat).as_quat()  # x, y, z, w
    return np.concatenate([q[:, 3:], q[:, :3]], axis=1).reshape(np.shape(m)[:-2] + (4,))


def _store_twin_props(obj, arm: Armature, binding: Binding | None) -> None:
    obj["ctwin_pose0"] = [float(x) for x in arm.pose0]
    obj["ctwin_transl0_mm"] = [float(x) for x in arm.transl0_mm]
    obj["ctwin_joints_mm"] = [float(x) for x in arm.joints_mm.reshape(-1)]
    if binding is not None:
        obj["ctwin_binding"] = binding.table()
        items = getattr(obj, "ctwin_binding_items", None)  # the UIList's collection (rig registered)
        if items is not None:
            items.clear()
            for label, bone in binding.table().items():
                it = items.add()
                it.label = label
                it.bone = bone


def helper_bone_name(vertebra: str) -> str:
    """The hidden non-deforming bone that carries a vertebra's rest placement on its upper joint."""
    return f"ctwin_upper_{vertebra}"


def twin_armature(obj) -> Armature:
    """The core ``Armature`` stored on a ctwin armature object."""
    try:
        j = np.asarray(obj["ctwin_joints_mm"], dtype=np.float64).reshape(N_JOINTS, 3)
        p0 = np.asarray(obj["ctwin_pose0"], dtype=np.float64)
        t0 = np.asarray(obj["ctwin_transl0_mm"], dtype=np.float64)
    except KeyError:
        raise CtwinError(f"object '{obj.name}' is not a ctwin armature (no ctwin_pose0)") from None
    arm = build_armature(j, p0, t0)
    # Pose-bone values are computed against Blender's own (float32) rest frames, so that Blender's
    # composition reproduces D_j exactly whatever rounding its bone rolls went through.
    bones = getattr(obj.data, "bones", None)
    if bones is not None and all(n in bones for n in JOINT_NAMES):
        for i, n in enumerate(JOINT_NAMES):
            u, _, vt = np.linalg.svd(np.array(bones[n].matrix_local.to_3x3(), dtype=np.float64))
            arm.frames[i] = u @ vt
    return arm


def create_armature(binding: Binding, name: str = "ctwin_rig", collection=None):
    """Create the twin's armature object (see the module docstring); returns the Object."""
    arm = binding.armature
    data = bpy.data.armatures.new(name)
    obj = bpy.data.objects.new(name, data)
    (collection or bpy.context.scene.collection).objects.link(obj)
    data.display_type = "STICK"
    obj.show_in_front = True
    prev_active = bpy.context.view_layer.objects.active
    bpy.context.view_layer.objects.active = obj
    for o in bpy.context.view_layer.objects:
        o.select_set(False)
    obj.select_set(True)
    bpy.ops.object.mode_set(mode="EDIT")
    try:
        ebs = {}
        for i, n in enumerate(JOINT_NAMES):
            eb = data.edit_bones.new(n)
            eb.head = Vector(arm.heads[i] * MM_TO_M)
            eb.tail = Vector(arm.tails[i] * MM_TO_M)
            eb.align_roll(Vector(arm.frames[i][:, 2]))
            eb.use_connect = False
            eb.use_deform = True
            ebs[n] = eb
        for i, n in enumerate(JOINT_NAMES):
            if PARENTS[i] >= 0:
                ebs[n].parent = ebs[JOINT_NAMES[PARENTS[i]]]
        for vb in binding.vertebrae.values():
            roll_z = Vector(arm.frames[vb.lower][:, 2])
            eb = data.edit_bones.new(vb.name)
            eb.head = Vector(vb.anchor_mm * MM_TO_M)
            eb.tail = Vector(vb.tail_mm * MM_TO_M)
            eb.align_roll(roll_z)
            eb.parent = ebs[JOINT_NAMES[vb.lower]]
            eb.use_connect = False
            eb.use_deform = True
            if vb.upper != vb.lower and vb.w > 0:
                hb = data.edit_bones.new(helper_bone_name(vb.name))
                hb.head, hb.tail, hb.roll = eb.head.copy(), eb.tail.copy(), eb.roll
                hb.parent = ebs[JOINT_NAMES[vb.upper]]
                hb.use_connect = False
                hb.use_deform = False
    finally:
        bpy.ops.object.mode_set(mode="OBJECT")
        bpy.context.view_layer.objects.active = prev_active or obj
    for pb in obj.pose.bones:
        pb.rotation_mode = "QUATERNION"
    for vb in binding.vertebrae.values():
        helper = helper_bone_name(vb.name)
        if helper not in data.bones:
            continue
        data.bones[helper].hide = True
        c = obj.pose.bones[vb.name].constraints.new("COPY_TRANSFORMS")
        c.name = f"ctwin blend {JOINT_NAMES[vb.upper]}"
        c.target = obj
        c.subtarget = helper
        c.influence = float(vb.w)
    _store_twin_props(obj, arm, binding)
    return obj


def bind_meshes(arm_obj, objects: dict, binding: Binding) -> None:
    """Parent mesh objects {label: Object} to the armature, Armature modifier, bulk vertex groups."""
    for name, obj in objects.items():
        n = len(obj.data.vertices)
        for vg in list(obj.vertex_groups):
            obj.vertex_groups.remove(vg)
        if name in binding.rigid:
            bl_data.set_vertex_group(obj, binding.rigid[name], np.arange(n), 1.0)
            obj["ctwin_bone"] = binding.rigid[name]
        elif name in binding.soft:
            sw = binding.soft[name]
            if len(sw.index) != n:
                raise CtwinError(f"object '{name}' has {n} vertices, its binding {len(sw.index)}")
            idx = sw.index.astype(np.int64)
            w = sw.weight.astype(np.float64)
            for j in np.unique(idx[w > 0]):
                sel = (idx == j) & (w > 0)
                rows = np.nonzero(sel.any(axis=1))[0]
                bl_data.set_vertex_group(obj, JOINT_NAMES[j], rows, (w * sel).sum(axis=1)[rows])
            obj["ctwin_bone"] = "smooth"
        else:
            raise CtwinError(f"structure '{name}' is not in the binding")
        obj.parent = arm_obj
        obj.matrix_parent_inverse = arm_obj.matrix_world.inverted()
        mod = obj.modifiers.get("ctwin_armature") or obj.modifiers.new("ctwin_armature", "ARMATURE")
        mod.object = arm_obj
        mod.use_vertex_groups = True
        mod.use_bone_envelopes = False
        mod.use_deform_preserve_volume = False


def pose_bone_values(arm: Armature, pose, transl_mm=None):
    """(quaternions (24, 4) w-first, root location (3,) metres) for a pose."""
    q, loc = arm.local_rotations(pose, transl_mm)
    return _matrix3_to_quat(q), loc * MM_TO_M


def set_pose(arm_obj, pose, transl_mm=None) -> None:
    """Set the 24 SMPL pose bones for a pose (72,) and translation (mm; None keeps t0)."""
    arm = twin_armature(arm_obj)
    quats, loc = pose_bone_values(arm, pose, transl_mm)
    for i, n in enumerate(JOINT_NAMES):
        pb = arm_obj.pose.bones[n]
        pb.rotation_mode = "QUATERNION"
        pb.rotation_quaternion = quats[i].tolist()
        pb.location = loc.tolist() if i == 0 else (0.0, 0.0, 0.0)
    arm_obj.update_tag()


def armature_pose(arm_obj, arm: Armature | None = None):
    """The current pose of the 24 SMPL bones as ``(pose (72,), transl_mm (3,))``."""
    arm = arm or twin_armature(arm_obj)
    q = np.zeros((N_JOINTS, 3, 3))
    for i, n in enumerate(JOINT_NAMES):
        m = arm_obj.pose.bones[n].matrix_basis
        q[i] = np.array(m.to_3x3().normalized())
    loc = np.array(arm_obj.pose.bones[JOINT_NAMES[0]].matrix_basis.translation) / MM_TO_M
    return arm.pose_from_local_rotations(q, loc)


def armature_pose_vector(obj) -> np.ndarray:
    """The current frame's pose of a ctwin armature as 72 floats (SMPL order, SPEC section 4)."""
    return armature_pose(obj)[0]


def bone_world_matrices_mm(arm_obj) -> dict:
    """{bone: 4x4} posed armature-space matrices in mm (after the depsgraph evaluated constraints)."""
    dg = bpy.context.evaluated_depsgraph_get()
    ev = arm_obj.evaluated_get(dg)
    out = {}
    for pb in ev.pose.bones:
        m = np.array(arm_obj.matrix_world @ pb.matrix)
        m[:3, 3] /= MM_TO_M
        out[pb.name] = m
    return out


__all__ = ["create_armature", "bind_meshes", "set_pose", "armature_pose", "armature_pose_vector", "twin_armature",
           "pose_bone_values", "bone_world_matrices_mm", "helper_bone_name"]
