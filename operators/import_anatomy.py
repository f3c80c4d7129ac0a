"""Operators "Import CT Anatomy" and "Import Anatomy Meshes" (thin layer over core).

All reading, checking and meshing happens in the core first (``core.meshes.mesh.import_anatomy`` /
``core.meshes.mesh.read_mesh``); Blender data is created only after that succeeded, so a bad input
leaves the scene untouched (and the whole operator is one undo step).

``create_anatomy(meshes, skin=None, stats=None)`` builds the collections Skeleton, Organs and
Skin, one object per structure named by label (LPS mm -> Blender metres, no axis swap), materials
coloured by tissue class and custom properties ``label_id``, ``label_name``, ``tissue``,
``hu_mean``, ``hu_std``, ``hu_p5``, ``hu_p95``, ``volume_cm3``. The CT skin surface is the object
``skin``; a segmentation label also named ``skin`` becomes the object ``skin_label``. The twin.blend
writer (``operators/twin_blend.py``) builds a twin's scene with it too.
The CT and segmentation paths are kept in ``scene.ctwin`` (``ct_path``, ``seg_path``).
"""
from __future__ import annotations

from pathlib import Path

import bpy
from bpy.props import CollectionProperty, IntProperty, StringProperty
from bpy_extras.io_utils import ImportHelper

from ..blender import data as bl_data
from ..core.volumes import labels as _labels
from ..core import progress
from ..core.errors import CtwinError

COLLECTIONS = {"bone": "Skeleton", "skin": "Skin"}  # every other tissue class -> "Organs"
TISSUE_COLORS = {
    "bone": (0.93, 0.89, 0.78, 1.0),
    "organ": (0.78, 0.36, 0.30, 1.0),
    "vessel": (0.70, 0.08, 0.10, 1.0),
    "muscle": (0.55, 0.18, 0.20, 1.0),
    "skin": (0.95, 0.76, 0.64, 0.35),
    "other": (0.50, 0.50, 0.50, 1.0),
}
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


def collection_for(tissue: str) -> str:
    return COLLECTIONS.get(tissue, "Organs")


def tissue_material(tissue: str):
    return bl_data.material(f"ctwin_{tissue}", TISSUE_COLORS.get(tissue, TISSUE_COLORS["other"]))


def create_anatomy(meshes: dict, skin=None, stats: dict | None = None) -> dict:
    """Create one object per Mesh in collections Skeleton / Organs / Skin; returns {name: Object}."""
    stats = stats or {}
    name_to_id = _labels.name_to_id()
    cols = {}
    objs = {}
    # (object name, label name, mesh, stats key). The CT skin surface is the object "skin" (stats
    # key "skin_surface"); a segmentation label also called "skin" (a skin-tissue shell; the key
    # "skin_label" from core.meshes.mesh.import_anatomy) becomes the object "skin_label".
    items = []
    for key, m in meshes.items():
        label = m.meta.get("label_name", "skin" if key == "skin_label" else key)
        obj_name = "skin_label" if (key == "skin" and skin is not None) else key
        items.append((obj_name, label, m, label))
    if skin is not None:
        items.append(("skin", "skin", skin, "skin_surface"))
    for obj_name, name, m, stats_key in items:
        tissue = "skin" if name == "skin" else _labels.tissue_class(name)
        cname = collection_for(tissue)
        if cname not in cols:
            cols[cname] = bl_data.ensure_collection(cname)
        obj = bl_data.mesh_object(obj_name, m.vertices, m.faces, cols[cname])
        obj.data.materials.append(tissue_material(tissue))
        props = {"label_id": int(m.meta.get("label_id", name_to_id.get(name, 0))), "label_name": name,
                 "tissue": tissue}
        st = stats.get(stats_key)
        if st:
            props.update({"hu_mean": st["mean"], "hu_std": st["std"], "hu_p5": st["p5"],
                          "hu_p95": st["p95"], "volume_cm3": st["volume_cm3"]})
        bl_data.set_custom_props(obj, props)
        objs[obj_name] = obj
    return objs


class _Progress:
    """Route core.progress to the window manager's progress bar for the operator's duration."""

    def __init__(self, context):
        self.wm = context.window_manager

    def __enter__(self):
        self.wm.progress_begin(0, 100)
        progress.set_sink(self._sink)
        return self

    def _sink(self, message, fraction):
        if fraction is not None:
            self.wm.progress_update(int(100 * max(0.0, min(1.0, fraction))))
        print(f"[ctwin] {message}")

    def __exit__(self, *exc):
        progress.set_sink(None)
        self.wm.progress_end()
        return False


def resolve_ct_path(path: str) -> Path:
    """A volume file as is; a DICOM file (or a folder) -> its series folder."""
    p = Path(bpy.path.abspath(path))
    if p.is_dir() or p.name.lower().endswith(VOLUME_SUFFIXES):
        return p
    return p.parent if p.is_file() else p


class CTWIN_OT_import_ct_anatomy(bpy.types.Operator, ImportHelper):
    """Import a CT and its segmentation as named, closed anatomy meshes in patient space"""

    bl_idname = "ctwin.import_ct_anatomy"
    bl_label = "Import CT Anatomy"
    bl_options = {"REGISTER", "UNDO"}

    filter_glob: StringProperty(default="*.nii;*.nii.gz;*.nrrd;*.nhdr;*.mha;*.mhd;*.dcm", options={"HIDDEN"})
    filepath: StringProperty(name="CT", description="CT volume file, or a file of a DICOM series",
                             subtype="FILE_PATH")
    seg_path: StringProperty(name="Segmentation",
                             description="Multi-label NIfTI (TotalSegmentator ids or labels.json) "
                                         "or a folder of <name>.nii.gz masks", subtype="FILE_PATH")
    smooth_iterations: IntProperty(name="Smoothing", default=10, min=0, max=100,
                                   description="Taubin smoothing iterations (volume kept within 2%)")
    max_triangles: IntProperty(name="Triangle Budget", default=0, min=0,
                               description="Total triangle budget for the label meshes (0 = no limit)")

    def execute(self, context):
        from ..core.meshes.mesh import body_mask, import_anatomy
        from ..core.volumes.segmentation import label_hu_stats

        if not self.seg_path:
            self.report({"ERROR"}, "no segmentation given (seg_path)")
            return {"CANCELLED"}
        try:
            with _Progress(context):
                ct, labelmap, names, meshes, skin = import_anatomy(
                    resolve_ct_path(self.filepath), Path(bpy.path.abspath(self.seg_path)),
                    smooth_iterations=self.smooth_iterations,
                    max_triangles=self.max_triangles or None)
                stats = label_hu_stats(ct, labelmap, names)
                body = body_mask(ct)
                skin_stats = label_hu_stats(ct, labelmap.with_data(body.astype("uint16")), {1: "skin_surface"})
                stats.update(skin_stats)
        except CtwinError as exc:
            self.report({"ERROR"}, " ".join(str(exc).split()))
            return {"CANCELLED"}
        objs = create_anatomy(meshes, skin, stats)
        context.scene.ctwin.ct_path = str(resolve_ct_path(self.filepath))
        context.scene.ctwin.seg_path = str(bpy.path.abspath(self.seg_path))
        self.report({"INFO"}, f"imported {len(objs)} objects ({len(meshes)} structures and the skin)")
        return {"FINISHED"}


class CTWIN_OT_import_anatomy_meshes(bpy.types.Operator, ImportHelper):
    """Import STL/OBJ/PLY anatomy meshes (names from file names, coordinates in LPS mm)"""

    bl_idname = "ctwin.import_anatomy_meshes"
    bl_label = "Import Anatomy Meshes"
    bl_options = {"REGISTER", "UNDO"}

    filter_glob: StringProperty(default="*.stl;*.obj;*.ply", options={"HIDDEN"})
    files: CollectionProperty(type=bpy.types.OperatorFileListElement, options={"HIDDEN", "SKIP_SAVE"})
    directory: StringProperty(subtype="DIR_PATH", options={"HIDDEN", "SKIP_SAVE"})

    def _paths(self) -> list[Path]:
        if self.files and self.directory:
            return [Path(bpy.path.abspath(self.directory)) / f.name for f in self.files if f.name]
        return [Path(bpy.path.abspath(self.filepath))] if self.filepath else []

    def execute(self, context):
        from ..core.meshes.mesh import read_mesh

        paths = self._paths()
        if not paths:
            self.report({"ERROR"}, "no mesh files given")
            return {"CANCELLED"}
        meshes = {}
        try:
            with _Progress(context):
                for n, p in enumerate(paths):
                    m = read_mesh(p)
                    if m.name in meshes:
                        raise CtwinError(f"two files give the structure name {m.name}")
                    meshes[m.name] = m
                    progress.report(f"read {p.name}", (n + 1) / len(paths))
        except CtwinError as exc:
            self.report({"ERROR"}, " ".join(str(exc).split()))
            return {"CANCELLED"}
        skin = meshes.pop("skin", None)
        objs = create_anatomy(meshes, skin)
        self.report({"INFO"}, f"imported {len(objs)} meshes")
        return {"FINISHED"}


def menu_import(self, context):
    self.layout.operator(CTWIN_OT_import_ct_anatomy.bl_idname, text="CT Anatomy (ctwin)")
    self.layout.operator(CTWIN_OT_import_anatomy_meshes.bl_idname, text="Anatomy Meshes (ctwin)")


CLASSES = (CTWIN_OT_import_ct_anatomy, CTWIN_OT_import_anatomy_meshes)
