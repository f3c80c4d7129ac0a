"""A twin's Blender scene: ``twin.blend`` written from a twin directory.

Translation only: the anatomy meshes (``import_anatomy.create_anatomy``), the armature and its
binding (``rig.armature``), the fitted body model, an X-ray camera at the AP metric view and the
"ctwin DRR" engine selected. The scene stores the twin directory relative to the .blend
(``scene.ctwin.twin_dir = "//"``), so the engine renders the twin's articulated CT at the
armature's pose in each frame (``render.providers.twin_provider``).

``finish_build`` is the twin build's finishing step (``core.twin.twin.build_twin(..., finish=...)``):
the core calls it with the temporary build folder, so twin.blend is inside the twin directory
when that appears.
"""
from __future__ import annotations

from pathlib import Path

import bpy
import numpy as np

from ..blender import data as bl_data
from ..blender.scene import ensure_registered
from ..core.fileio import read_json
from ..core.meshes.mesh import read_mesh
from ..core.progress import report
from ..core.body.skeleton import JOINT_NAMES
from ..core.twin.twin import Twin
from ..render.camera import set_xray_camera
from ..rig.armature import bind_meshes, create_armature
from .import_anatomy import create_anatomy

BLEND_NAME = "twin.blend"


def write_twin_blend(twin_dir, blend_path, *, reset: bool = True) -> Path:
    """Write ``twin.blend`` for the twin directory ``twin_dir`` (the directory may still be a
    temporary build folder: paths are stored relative to the .blend)."""
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

    body = read_mesh(twin_dir / "meshes" / "body_model.ply", name="body_model")
    body_obj = bl_data.mesh_object("body_model", body.vertices, body.faces, rig_col)
    body_obj.display_type = "WIRE"
    body_obj.hide_render = True
    bm = twin.body_model
    w = np.asarray(bm.weights, dtype=np.float64)
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


def finish_build(build_dir) -> None:
    """The twin build's finishing step: write ``twin.blend`` into the (temporary) build folder."""
    report("build 6/6: write twin.blend", 0.9)
    write_twin_blend(build_dir, Path(build_dir) / BLEND_NAME)
