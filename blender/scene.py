"""What the Blender layer looks up in a scene: the imported anatomy, the twin's armature, and the
extension's registration when running from a clone."""
from __future__ import annotations

import bpy

from .. import register as _register_extension  # the root's register(): it imports no module here
from ..core.meshes.mesh import Mesh
from . import data as bl_data

# The collections "Import CT Anatomy" and "Import Anatomy Meshes" put the structures in.
ANATOMY_COLLECTIONS = ("Skeleton", "Organs", "Skin")


def anatomy_objects(collections=ANATOMY_COLLECTIONS) -> list:
    """The imported anatomy's mesh objects in ``collections`` (nested collections included), each
    once, in collection order."""
    out, seen = [], set()
    for cname in collections:
        col = bpy.data.collections.get(cname)
        if col is None:
            continue
        for obj in col.all_objects:
            if obj.type == "MESH" and obj.name not in seen:
                seen.add(obj.name)
                out.append(obj)
    return out


def anatomy_meshes(objects) -> dict:
    """{object name: core Mesh} of mesh objects, vertices in world LPS mm."""
    out = {}
    for obj in objects:
        v, f = bl_data.mesh_arrays(obj, world=True)
        out[obj.name] = Mesh(v, f, obj.name)
    return out


def twin_armature_object(scene):
    """The scene's twin armature (the one made by ``rig.armature.create_armature``), else its
    first armature, else None."""
    for obj in scene.objects:
        if obj.type == "ARMATURE" and obj.get("ctwin_joints_mm") is not None:
            return obj
    for obj in scene.objects:
        if obj.type == "ARMATURE":
            return obj
    return None


def ensure_registered() -> None:
    """Register the extension's classes when running from a clone (the bpy module, no install)."""
    engines = {getattr(cls, "bl_idname", None) for cls in bpy.types.RenderEngine.__subclasses__()
               if getattr(cls, "is_registered", False)}
    if "CTWIN_DRR" in engines:
        return
    _register_extension()
