"""Bulk numpy <-> Blender data transfer (foreach_get / foreach_set), shared by the Blender layer.

Units: the core works in LPS millimetres; Blender world = LPS in metres (SPEC section 2). The
helpers take and return arrays in the units given by ``scale`` (default: mm in, metres in Blender,
``scale = MM_TO_M``), with no axis swap.

Public helpers:
    mesh_object(name, vertices, faces, collection=None, scale=MM_TO_M) -> Object
    set_mesh_data(mesh, vertices, faces, scale=MM_TO_M)   (fills an empty bpy Mesh)
    mesh_arrays(obj_or_mesh, scale=M_TO_MM, world=False) -> (vertices (N,3), faces (M,3))
    vertex_coords(obj_or_mesh, scale=M_TO_MM) -> (N,3);  set_vertex_coords(obj_or_mesh, co, scale=MM_TO_M)
    set_vertex_group(obj, name, indices, weights=1.0) -> VertexGroup   (bulk, grouped by weight)
    vertex_group_weights(obj, name) -> (N,) float32 (0 where not assigned)
    ensure_collection(name, parent=None) -> Collection
    material(name, rgba) -> Material
    set_custom_props(id_data, props: dict)  (numpy scalars/arrays converted)
"""
from __future__ import annotations

import bpy
import numpy as np

from ..core.body.skeleton import MM_TO_M
from ..core.volumes.volume import apply_transform

M_TO_MM = 1.0 / MM_TO_M


def _mesh(obj_or_mesh):
    return obj_or_mesh.data if isinstance(obj_or_mesh, bpy.types.Object) else obj_or_mesh


def set_mesh_data(mesh, vertices, faces, scale: float = MM_TO_M, validate: bool = False):
    """Fill an empty ``bpy.types.Mesh`` with triangles in bulk.

    Vertex and face order are kept exactly (index i in Blender = row i of the arrays), which
    the rig relies on; ``validate=True`` lets Blender clean the mesh (it may drop elements).
    """
    v = np.ascontiguousarray(np.asarray(vertices, dtype=np.float64) * scale, dtype=np.float32).reshape(-1)
    f = np.ascontiguousarray(faces, dtype=np.int32).reshape(-1, 3)
    nv, nf = v.size // 3, f.shape[0]
    if nf and (f.min() < 0 or f.max() >= nv):
        raise ValueError("face index out of range")
    mesh.vertices.add(nv)
    mesh.vertices.foreach_set("co", v)
    mesh.loops.add(3 * nf)
    mesh.loops.foreach_set("vertex_index", f.reshape(-1))
    mesh.polygons.add(nf)
    mesh.polygons.foreach_set("loop_start", np.arange(0, 3 * nf, 3, dtype=np.int32))
    mesh.update(calc_edges=True)
    if validate:
        mesh.validate(clean_customdata=False)
    return mesh


def mesh_object(name: str, vertices, faces, collection=None, scale: float = MM_TO_M):
    """Create a mesh object from (N,3) vertices and (M,3) triangles and link it to ``collection``."""
    me = bpy.data.meshes.new(name)
    set_mesh_data(me, vertices, faces, scale)
    obj = bpy.data.objects.new(name, me)
    (collection or bpy.context.scene.collection).objects.link(obj)
    return obj


def vertex_coords(obj_or_mesh, scale: float = M_TO_MM) -> np.ndarray:
    me = _mesh(obj_or_mesh)
    co = np.empty(len(me.vertices) * 3, dtype=np.float32)
    me.vertices.foreach_get("co", co)
    return co.reshape(-1, 3).astype(np.float64) * scale


def set_vertex_coords(obj_or_mesh, coords, scale: float = MM_TO_M) -> None:
    me = _mesh(obj_or_mesh)
    co = np.ascontiguousarray(np.asarray(coords, dtype=np.float64) * scale, dtype=np.float32).reshape(-1)
    if co.size != len(me.vertices) * 3:
        raise ValueError(f"expected {len(me.vertices)} vertices, got {co.size // 3}")
    me.vertices.foreach_set("co", co)
    me.update()


def mesh_arrays(obj_or_mesh, scale: float = M_TO_MM, world: bool = False):
    """(vertices (N,3) float64, triangles (M,3) int64); polygons are fan-triangulated.

    ``world=True`` (objects only) applies the object's world matrix before scaling.
    """
    me = _mesh(obj_or_mesh)
    v = vertex_coords(me, 1.0)
    if world and isinstance(obj_or_mesh, bpy.types.Object):
        mw = np.array(obj_or_mesh.matrix_world, dtype=np.float64)
        v = apply_transform(mw, v)
    v = v * scale
    npoly = len(me.polygons)
    start = np.empty(npoly, dtype=np.int32)
    total = np.empty(npoly, dtype=np.int32)
    me.polygons.foreach_get("loop_start", start)
    me.polygons.foreach_get("loop_total", total)
    loops = np.empty(len(me.loops), dtype=np.int32)
    me.loops.foreach_get("vertex_index", loops)
    if npoly and np.all(total == 3):
        return v, loops.reshape(-1, 3).astype(np.int64)
    tris = []
    for t in np.unique(total):
        sel = start[total == t]
        for c in range(1, t - 1):
            tris.append(np.stack([loops[sel], loops[sel + c], loops[sel + c + 1]], axis=1))
    f = np.concatenate(tris).astype(np.int64) if tris else np.zeros((0, 3), dtype=np.int64)
    return v, f


def set_vertex_group(obj, name: str, indices, weights=1.0):
    """Assign ``weights`` (scalar or per-index) to ``indices`` in group ``name`` (created if needed).

    Blender has no foreach_set for weights: indices are grouped by weight (quantised to 1e-4) and
    added with one ``VertexGroup.add`` call per distinct weight.
    """
    vg = obj.vertex_groups.get(name) or obj.vertex_groups.new(name=name)
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size == 0:
        return vg
    w = np.broadcast_to(np.asarray(weights, dtype=np.float64), idx.shape)
    q = np.round(w * 1e4).astype(np.int64)
    order = np.argsort(q, kind="stable")
    qs, ids = q[order], idx[order]
    cuts = np.flatnonzero(np.diff(qs)) + 1
    for grp_q, grp_idx in zip(np.split(qs, cuts), np.split(ids, cuts)):
        vg.add(grp_idx.tolist(), float(grp_q[0]) * 1e-4, "REPLACE")
    return vg


def vertex_group_weights(obj, name: str) -> np.ndarray:
    """Per-vertex weights of one group (0 where a vertex is not in it)."""
    vg = obj.vertex_groups.get(name)
    n = len(obj.data.vertices)
    out = np.zeros(n, dtype=np.float32)
    if vg is None:
        return out
    gi = vg.index
    for v in obj.data.vertices:  # Blender exposes no bulk access to deform weights
        for g in v.groups:
            if g.group == gi:
                out[v.index] = g.weight
                break
    return out


def ensure_collection(name: str, parent=None):
    """The collection ``name`` (created if missing), linked under ``parent`` (default: scene)."""
    parent = parent or bpy.context.scene.collection
    col = bpy.data.collections.get(name)
    if col is None:
        col = bpy.data.collections.new(name)
    if col.name not in parent.children:
        parent.children.link(col)
    return col


def material(name: str, rgba):
    """A material with a uniform base colour (reused when it exists)."""
    mat = bpy.data.materials.get(name)
    if mat is None:
        mat = bpy.data.materials.new(name)
    rgba = tuple(float(c) for c in rgba)
    mat.diffuse_color = rgba
    if mat.node_tree is not None:
        bsdf = mat.node_tree.nodes.get("Principled BSDF")
        if bsdf is not None:
            bsdf.inputs["Base Color"].default_value = rgba
    return mat


def _plain(v):
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


def set_custom_props(id_data, props: dict) -> None:
    for k, v in props.items():
        id_data[k] = _plain(v)
