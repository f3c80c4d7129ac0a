"""Blender layer: build a twin's scene (``twin.blend``) from a twin directory.

Translation only: the anatomy meshes, the armature and its binding, the fitted body model, an X-ray
camera at the AP metric view, and the "ctwin DRR" engine selected. The scene stores the twin
directory relative to the .blend file, so the engine renders the twin's articulated CT at the
armature's pose in each frame.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

MM = 0.001  # Blender units (metres) per mm


def ensure_registered() -> None:
    """Register the extension's classes when running from a clone (the bpy module, no install)."""
    import bpy

    engines = {getattr(cls, "bl_idname", None) for cls in bpy.types.RenderEngine.__subclasses__()
               if getattr(cls, "is_registered", False)}
    if "CTWIN_DRR" in engines:
        return
    from . import register

    register()


def set_xray_camera(scene, geometry, name: str = "xray_source"):
    """Create or update the scene camera as the X-ray source of ``geometry`` (render.camera maths)."""
    import bpy

    from .render.camera import setup_xray_camera

    cam_data = bpy.data.cameras.get(name) or bpy.data.cameras.new(name)
    cam = bpy.data.objects.get(name) or bpy.data.objects.new(name, cam_data)
    if cam.name not in scene.collection.objects:
        scene.collection.objects.link(cam)
    setup_xray_camera(cam, geometry, scene)
    scene.camera = cam
    return cam


def write_twin_blend(twin_dir, blend_path, *, reset: bool = True) -> Path:
    """Write ``twin.blend`` for the twin directory ``twin_dir`` (the directory may still be a
    temporary build folder: paths are stored relative to the .blend)."""
    import bpy

    from . import bl_data
    from .core.fileio import read_json
    from .core.twin import Twin
    from .operators.import_anatomy import create_anatomy
    from .rig.armature import bind_meshes, create_armature

    twin_dir = Path(twin_dir)
    if reset:
        bpy.ops.wm.read_factory_settings(use_empty=True)
    ensure_registered()
    twin = Twin(twin_dir, read_json(twin_dir / "twin.json"))
    scene = bpy.context.scene
    scene.name = "ctwin"
    meshes = twin.meshes(include_skin=False)
    skin = twin.meshes()["skin"]
    stats = {}
    objs = create_anatomy(meshes, skin, stats)
    binding = twin.binding
    rig_col = bl_data.ensure_collection("Rig")
    arm_obj = create_armature(binding, collection=rig_col)
    bind_meshes(arm_obj, objs, binding)

    from .core.mesh import read_mesh

    body = read_mesh(twin_dir / "meshes" / "body_model.ply", name="body_model")
    body_obj = bl_data.mesh_object("body_model", body.vertices, body.faces, rig_col)
    body_obj.display_type = "WIRE"
    body_obj.hide_render = True
    bm = twin.body_model
    w = np.asarray(bm.weights, dtype=np.float64)
    from .core.skeleton import JOINT_NAMES

    for j, n in enumerate(JOINT_NAMES):
        rows = np.nonzero(w[:, j] > 1e-4)[0]
        if len(rows):
            bl_data.set_vertex_group(body_obj, n, rows, w[rows, j])
    body_obj.parent = arm_obj
    mod = body_obj.modifiers.new("ctwin_armature", "ARMATURE")
    mod.object = arm_obj

    views = twin.default_views(size=512)
    set_xray_camera(scene, views["ap"])
    scene.render.engine = "CTWIN_DRR"
    scene.ctwin.twin_dir = "//"
    scene.render.fps = 24
    scene.frame_start = 1
    scene.frame_end = 1
    scene.render.filepath = "//render/"
    blend_path = Path(blend_path)
    bpy.ops.wm.save_as_mainfile(filepath=str(blend_path), check_existing=False, compress=True)
    return blend_path


# --------------------------------------------------------------------------------------------
# the DRR engine's volume provider for twins
# --------------------------------------------------------------------------------------------
def twin_armature_object(scene):
    """The scene's twin armature (the one created by ``rig.armature.create_armature``)."""
    for obj in scene.objects:
        if obj.type == "ARMATURE" and obj.get("ctwin_joints_mm") is not None:
            return obj
    for obj in scene.objects:
        if obj.type == "ARMATURE":
            return obj
    return None


def twin_provider(scene, frame):
    """Posed projector scene of the twin at the armature's current pose, or None without a twin."""
    import os

    import bpy

    from .core.articulated import to_projector_scene
    from .core.twin import load_twin
    from .render import scene_volumes
    from .rig.armature import armature_pose

    settings = getattr(scene, "ctwin", None)
    if settings is None or not settings.twin_dir:
        return None
    d = os.path.realpath(bpy.path.abspath(settings.twin_dir))
    meta = os.path.join(d, "twin.json")
    if not os.path.isfile(meta):
        from .core.errors import CtwinError

        raise CtwinError(f"the scene's twin directory {d} has no twin.json")
    twin = scene_volumes.cached(("twin", d, os.stat(meta).st_mtime_ns), lambda: load_twin(d))
    arm = twin_armature_object(scene)
    if arm is not None:
        pose, transl = armature_pose(scene_volumes.evaluated(arm))
    else:
        pose, transl = twin.pose0, None
    return to_projector_scene(twin.posed_scene(pose, transl))


def register():
    from .render import scene_volumes

    scene_volumes.register_provider(session_provider)
    scene_volumes.register_provider(twin_provider)


def unregister():
    from .render import scene_volumes

    scene_volumes.unregister_provider(twin_provider)
    scene_volumes.unregister_provider(session_provider)


def _evaluated_bone_deltas(arm_obj) -> dict:
    """{bone: 4x4} rest -> posed world transforms (mm) of every bone of the evaluated armature."""
    from .render import scene_volumes

    ev = scene_volumes.evaluated(arm_obj)
    mw = np.array(arm_obj.matrix_world, dtype=np.float64)
    out = {}
    for pb in ev.pose.bones:
        posed = mw @ np.array(pb.matrix, dtype=np.float64)
        rest = mw @ np.array(pb.bone.matrix_local, dtype=np.float64)
        d = posed @ np.linalg.inv(rest)
        d[:3, 3] /= MM
        out[pb.name] = d
    return out


ANATOMY_COLLECTIONS = ("Skin", "Organs", "Skeleton")


def _anatomy_objects() -> list:
    """The imported anatomy's mesh objects (collections Skin, Organs, Skeleton)."""
    import bpy

    out = []
    for cname in ANATOMY_COLLECTIONS:
        col = bpy.data.collections.get(cname)
        if col is not None:
            out.extend(o for o in col.all_objects if o.type == "MESH")
    return out


def scene_mesh_volume(objects, spacing: float = 3.0):
    """Mesh mode in a scene: the anatomy objects (LPS mm) voxelised into a synthetic CT and
    labelmap (``core.mesh_volume``, each structure's HU by its kind)."""
    from . import bl_data
    from .core.mesh import Mesh
    from .core.mesh_volume import hu_table, prepare_mesh, voxelise_meshes

    meshes = {}
    for obj in objects:
        v, f = bl_data.mesh_arrays(obj, world=True)
        meshes[obj.name] = prepare_mesh(Mesh(v, f, obj.name))
    return voxelise_meshes(meshes, hu_table(meshes), spacing)


def session_provider(scene, frame):
    """The panel workflow's twin (no twin directory): the CT and segmentation stored by "Import CT
    Anatomy" -- or, after "Import Anatomy Meshes" with no CT, the anatomy objects voxelised
    (mesh mode, ``scene_mesh_volume``) -- decomposed once for the rig made by "Build Rig", posed by
    the evaluated armature."""
    import os

    from .core.articulated import posed_scene, prepare_articulated, to_projector_scene
    from .core.ct import load_ct
    from .core.segmentation import load_segmentation
    from .core.skeleton import JOINT_NAMES
    from .render import scene_volumes

    settings = getattr(scene, "ctwin", None)
    if settings is not None and settings.twin_dir:
        return None  # twin_provider renders twins with a directory
    ct_path, seg_path = scene.get("ctwin_ct_path"), scene.get("ctwin_seg_path")
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
        objects = _anatomy_objects()
        if not any(o.name == "skin" for o in objects):
            return None
        source = ("meshes",) + tuple(sorted((o.name, len(o.data.vertices)) for o in objects))

        def volumes():
            mv = scene_mesh_volume(objects)
            return mv.ct, mv.labelmap, mv.names
    key = ("session",) + source + (arm.name, hash(joints.round(3).tobytes()), tuple(sorted(table.items())))

    def build():
        ct, labelmap, names = volumes()
        bones = arm.data.bones
        joint_of = {}
        for label, bone in table.items():
            if bone == "smooth" or bone not in bones:
                continue
            b = bones[bone]
            while b is not None and b.name not in JOINT_NAMES:
                b = b.parent
            if b is not None:
                joint_of[label] = b.name
        return prepare_articulated(ct, labelmap, names, joint_of, joints)

    art = scene_volumes.cached(key, build)
    deltas = _evaluated_bone_deltas(arm)
    bone_deltas = {label: deltas[bone] for label, bone in table.items() if bone in deltas}
    joint_deltas = np.stack([deltas[n] for n in JOINT_NAMES])
    from .core.twin import WARP_SPACING_MM

    return to_projector_scene(posed_scene(art, bone_deltas, joint_deltas, warp_spacing_mm=WARP_SPACING_MM))
