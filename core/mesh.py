"""Triangle meshes of anatomy in LPS world mm: multi-label surface nets, smoothing, decimation,
the CT skin (body without the patient table), mesh IO, and ``import_anatomy``.

Multi-label surface nets
    One vertex per 2x2x2 cell of voxel centres whose labels are not all equal (the dual grid),
    one quad per pair of face-adjacent voxels with different labels. A quad between labels a and
    b is emitted once; label a's mesh uses it as is and label b's mesh uses it reversed, so
    neighbouring structures share their boundary exactly (same vertices, no gap, no overlap).
    Before smoothing, each label's surface is exactly the boundary of its voxels, so its
    enclosed volume equals the voxel volume. Each label's mesh is a closed, consistently oriented
    surface (every edge is used equally often in both directions), so volumes and winding numbers
    are exact; an edge where two voxels of one label touch only diagonally is used by 4 faces of
    that label (non-manifold but still closed), as in every surface-nets/marching method without
    topology repair. ``Mesh.nonmanifold_edges()`` counts these.

Smoothing
    Taubin (lambda/mu) smoothing of the whole shared complex, each vertex clamped to its dual
    cell (so sheets never cross and shared vertices stay shared). Each label's volume change is
    then bounded: vertices are blended back towards their voxel-exact positions, label by label,
    until every label's volume is within ``volume_tol`` (default 1.5 %, under the 2 % contract) of
    its voxel volume. Thin structures therefore end up smoothed less than bulky ones.

Decimation (``max_triangles``)
    Vertex clustering on the shared complex: a uniform world grid whose cell size is found by
    bisection so that the total triangle count meets the budget; each cluster's vertex is the
    mean of its members. It acts on the shared vertices, so shared boundaries stay shared after
    decimation; it changes volumes (checked and reported) and may leave non-manifold edges.

Coordinates: vertices are LPS world mm (``labelmap.affine`` applied); faces are wound with
outward normals whatever the sign of the affine's determinant.

Deviation from the planned API: none; ``import_anatomy`` also lives here (it needs the mesher).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numba as nb
import numpy as np

from .errors import CtwinError
from .progress import report
from .volume import Volume


# --------------------------------------------------------------------------------------------
# Mesh container and IO


@dataclass
class Mesh:
    vertices: np.ndarray  # (N, 3) float64, LPS mm
    faces: np.ndarray  # (M, 3) int64
    name: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.vertices = np.ascontiguousarray(self.vertices, dtype=np.float64).reshape(-1, 3)
        self.faces = np.ascontiguousarray(self.faces, dtype=np.int64).reshape(-1, 3)

    @property
    def n_faces(self) -> int:
        return int(self.faces.shape[0])

    def volume(self) -> float:
        """Signed enclosed volume in mm^3 (positive for outward-wound closed meshes)."""
        return mesh_volume(self.vertices, self.faces)

    def area(self) -> float:
        v = self.vertices[self.faces]
        return float(0.5 * np.linalg.norm(np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0]), axis=1).sum())

    def _edge_balance(self):
        f = self.faces
        e = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
        s = np.sort(e, axis=1)
        sign = np.where(e[:, 0] < e[:, 1], 1, -1)
        key = s[:, 0] * (int(self.vertices.shape[0]) + 1) + s[:, 1]
        uniq, inv, counts = np.unique(key, return_inverse=True, return_counts=True)
        bal = np.bincount(inv, weights=sign, minlength=uniq.size)
        return counts, bal

    def is_closed(self) -> bool:
        """Every edge is used equally often in both directions (a closed oriented surface)."""
        if self.n_faces == 0:
            return False
        counts, bal = self._edge_balance()
        return bool(np.all(bal == 0))

    def nonmanifold_edges(self) -> int:
        """Edges used by more than two faces."""
        if self.n_faces == 0:
            return 0
        counts, _ = self._edge_balance()
        return int(np.count_nonzero(counts > 2))

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return self.vertices.min(axis=0), self.vertices.max(axis=0)


def mesh_volume(vertices: np.ndarray, faces: np.ndarray) -> float:
    if len(faces) == 0:
        return 0.0
    v = vertices[faces]
    c = v.mean(axis=(0, 1))  # reference point near the mesh: better conditioned
    a, b, d = v[:, 0] - c, v[:, 1] - c, v[:, 2] - c
    return float(np.einsum("ij,ij->i", a, np.cross(b, d)).sum() / 6.0)


def _pair_nonmanifold(vertices, faces, hes, u, v, flip=False) -> list[tuple[int, int]]:
    """Pair the half-edges of one non-manifold edge (2k faces) geometrically.

    Faces around the edge are sorted by angle; consecutive faces of opposite direction that
    bound a wedge of the solid (both outward normals point away from the wedge) are paired, so
    the solid's pieces that touch only along this edge come apart.
    """
    a = int(min(u[hes[0]], v[hes[0]]))
    b = int(max(u[hes[0]], v[hes[0]]))
    pa, pb = vertices[a], vertices[b]
    e = pb - pa
    e /= max(np.linalg.norm(e), 1e-12)
    x = np.cross(e, [1.0, 0.0, 0.0])
    if np.linalg.norm(x) < 1e-6:
        x = np.cross(e, [0.0, 1.0, 0.0])
    x /= np.linalg.norm(x)
    y = np.cross(e, x)
    f = hes // 3
    c = hes % 3
    w = faces[f, (c + 2) % 3]
    d = vertices[w] - pa
    ang = np.arctan2(d @ y, d @ x)
    order = np.argsort(ang)
    hs, angs = hes[order], ang[order]
    fwd = u[hs] == a
    tri = vertices[faces[hs // 3]]
    nrm = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    k = len(hs)
    options = []
    for s in (0, 1):
        pairs, score, ok = [], 0, True
        for i in range(s, s + k, 2):
            i0, i1 = i % k, (i + 1) % k
            if fwd[i0] == fwd[i1]:
                ok = False
                break
            gap = (angs[i1] - angs[i0]) % (2 * np.pi)
            mid = angs[i0] + 0.5 * gap
            m = np.cos(mid) * x + np.sin(mid) * y
            score += int(m @ nrm[i0] < 0 and m @ nrm[i1] < 0)
            pairs.append((int(hs[i0]), int(hs[i1])))
        if ok:
            options.append((score, s, pairs))
    if not options:
        return []
    options.sort(key=lambda o: (-o[0], o[1]))  # most solid wedges first
    return options[-1][2] if flip else options[0][2]


def make_manifold(vertices: np.ndarray, faces: np.ndarray):
    """Split vertices so that a closed oriented surface becomes 2-manifold.

    Every edge ends up in exactly two faces and every vertex has one fan of faces; where pieces
    touched only along an edge or at a vertex, they get their own copies of those vertices (same
    positions). Triangles and volume are unchanged. Returns (vertices, faces, source vertex ids).
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    faces = np.asarray(faces, dtype=np.int64)
    nf = len(faces)
    if nf == 0:
        return vertices, faces, np.arange(len(vertices))
    n = int(len(vertices)) + 1
    u = faces.reshape(-1)
    v = faces[:, [1, 2, 0]].reshape(-1)
    und = np.minimum(u, v) * n + np.maximum(u, v)
    order = np.argsort(und, kind="stable")
    su = und[order]
    starts = np.flatnonzero(np.r_[True, su[1:] != su[:-1]])
    counts = np.diff(np.r_[starts, len(su)])
    two = starts[counts == 2]
    h1, h2 = order[two], order[two + 1]
    ok = (u[h1] == v[h2]) & (v[h1] == u[h2])  # opposite directions: a proper manifold edge
    pairs = [np.stack([h1[ok], h2[ok]], axis=1)]
    multi = [(int(s), int(cnt)) for s, cnt in zip(starts[counts > 2], counts[counts > 2])]

    def split(flipped):
        extra = []
        for s, cnt in multi:
            extra += _pair_nonmanifold(vertices, faces, order[s:s + cnt], u, v, s in flipped)
        p = np.concatenate(pairs + ([np.asarray(extra, dtype=np.int64)] if extra else []))
        a, b = p[:, 0], p[:, 1]
        fa, ca, fb, cb = a // 3, a % 3, b // 3, b % 3
        # corner of u(a) in a's face ~ corner of the same vertex in b's face (likewise for v(a))
        src = np.concatenate([3 * fa + ca, 3 * fa + (ca + 1) % 3])
        dst = np.concatenate([3 * fb + (cb + 1) % 3, 3 * fb + cb])
        g = coo_matrix((np.ones(len(src), np.int8), (src, dst)), shape=(3 * nf, 3 * nf))
        ncomp, comp = connected_components(g, directed=False)
        return ncomp, comp

    ncomp, comp = split(set())
    if multi:
        # where an edge is still shared by > 2 faces (both ends stayed one fan), pair it the
        # other way: the pieces then join across the edge instead of touching along it
        cf = comp.reshape(-1, 3)
        e = np.sort(np.stack([cf.reshape(-1), cf[:, [1, 2, 0]].reshape(-1)], axis=1), axis=1)
        key = e[:, 0] * (ncomp + 1) + e[:, 1]
        _, inv_k, cnt_k = np.unique(key, return_inverse=True, return_counts=True)
        still = cnt_k[inv_k] > 2
        if still.any():
            flipped = {s for s, c in multi if still[order[s:s + c]].any()}
            ncomp2, comp2 = split(flipped)
            cf2 = comp2.reshape(-1, 3)
            e2 = np.sort(np.stack([cf2.reshape(-1), cf2[:, [1, 2, 0]].reshape(-1)], axis=1), axis=1)
            _, inv2, cnt2 = np.unique(e2[:, 0] * (ncomp2 + 1) + e2[:, 1], return_inverse=True,
                                      return_counts=True)
            if np.count_nonzero(cnt2 > 2) < np.count_nonzero(cnt_k > 2):
                ncomp, comp = ncomp2, comp2
    source = np.empty(ncomp, dtype=np.int64)
    source[comp] = u
    return vertices[source], comp.reshape(-1, 3).astype(np.int64), source


def write_ply(mesh: Mesh, path) -> None:
    """Write a binary little-endian PLY (float32 x y z in mm, uchar-count int32 faces), atomically."""
    from .fileio import atomic_path

    v = np.ascontiguousarray(mesh.vertices, dtype="<f4")
    f = np.asarray(mesh.faces)
    if f.size and (f.min() < 0 or f.max() >= len(v)):
        raise CtwinError(f"mesh {mesh.name}: face index out of range")
    header = (
        "ply\nformat binary_little_endian 1.0\n"
        f"comment ctwin mesh {mesh.name or 'unnamed'} (LPS mm)\n"
        f"element vertex {len(v)}\nproperty float x\nproperty float y\nproperty float z\n"
        f"element face {len(f)}\nproperty list uchar int vertex_indices\nend_header\n"
    ).encode("ascii")
    rec = np.empty(len(f), dtype=[("n", "u1"), ("i", "<i4", (3,))])
    rec["n"] = 3
    rec["i"] = f
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(header)
            fh.write(v.tobytes())
            fh.write(rec.tobytes())


def read_mesh(path, name: str | None = None) -> Mesh:
    """Read STL/OBJ/PLY (via trimesh) as a Mesh; the name defaults to the file name's stem.

    The file's coordinates are taken as LPS mm, unchanged.
    """
    import trimesh

    path = Path(path)
    if not path.is_file():
        raise CtwinError(f"mesh file not found: {path}")
    if path.suffix.lower() not in (".stl", ".obj", ".ply"):
        raise CtwinError(f"{path.name}: unsupported mesh format (use STL, OBJ or PLY)")
    try:
        m = trimesh.load(str(path), force="mesh", process=False)
    except Exception as exc:  # trimesh raises many types for malformed files
        raise CtwinError(f"cannot read mesh {path.name}: {' '.join(str(exc).split())[:160]}") from None
    faces = np.asarray(getattr(m, "faces", np.zeros((0, 3))))
    verts = np.asarray(getattr(m, "vertices", np.zeros((0, 3))))
    if len(faces) == 0 or len(verts) == 0:
        raise CtwinError(f"mesh {path.name} has no triangles (corrupt or empty file?)")
    if not np.all(np.isfinite(verts)):
        raise CtwinError(f"mesh {path.name} has non-finite vertex coordinates")
    if name is None:
        name = path.name.split(".")[0]
    return Mesh(verts, faces, name, {"source": str(path)})


# --------------------------------------------------------------------------------------------
# Multi-label surface nets (numba)


@nb.njit(cache=True)
def _sn_vertices(lab):
    """Dual vertex id per cell of the padded label array (-1 where all 8 labels are equal)."""
    nx, ny, nz = lab.shape
    vid = np.full((nx - 1, ny - 1, nz - 1), -1, dtype=np.int32)
    n = 0
    for i in range(nx - 1):
        for j in range(ny - 1):
            for k in range(nz - 1):
                a = lab[i, j, k]
                if (lab[i + 1, j, k] != a or lab[i, j + 1, k] != a or lab[i + 1, j + 1, k] != a
                        or lab[i, j, k + 1] != a or lab[i + 1, j, k + 1] != a
                        or lab[i, j + 1, k + 1] != a or lab[i + 1, j + 1, k + 1] != a):
                    vid[i, j, k] = n
                    n += 1
    return vid, n


@nb.njit(cache=True)
def _sn_quads(lab, vid, nverts):
    """Quads (Q, 4) of dual vertex ids with the labels on their two sides (Q, 2).

    A quad's winding gives a normal pointing from side 0 to side 1.
    """
    nx, ny, nz = lab.shape
    cap = 1024
    quads = np.empty((cap, 4), dtype=np.int32)
    sides = np.empty((cap, 2), dtype=np.int32)
    q = 0
    for i in range(1, nx - 1):
        for j in range(1, ny - 1):
            for k in range(1, nz - 1):
                a = lab[i, j, k]
                for ax in range(3):
                    if ax == 0:
                        b = lab[i + 1, j, k]
                    elif ax == 1:
                        b = lab[i, j + 1, k]
                    else:
                        b = lab[i, j, k + 1]
                    if b == a:
                        continue
                    if q >= cap:
                        cap *= 2
                        nq = np.empty((cap, 4), dtype=np.int32)
                        ns = np.empty((cap, 2), dtype=np.int32)
                        nq[:q] = quads[:q]
                        ns[:q] = sides[:q]
                        quads = nq
                        sides = ns
                    if ax == 0:  # cells (i, j-1..j, k-1..k); ccw in (y, z) seen from +x
                        quads[q, 0] = vid[i, j - 1, k - 1]
                        quads[q, 1] = vid[i, j, k - 1]
                        quads[q, 2] = vid[i, j, k]
                        quads[q, 3] = vid[i, j - 1, k]
                    elif ax == 1:  # ccw in (z, x) seen from +y
                        quads[q, 0] = vid[i - 1, j, k - 1]
                        quads[q, 1] = vid[i - 1, j, k]
                        quads[q, 2] = vid[i, j, k]
                        quads[q, 3] = vid[i, j, k - 1]
                    else:  # ccw in (x, y) seen from +z
                        quads[q, 0] = vid[i - 1, j - 1, k]
                        quads[q, 1] = vid[i, j - 1, k]
                        quads[q, 2] = vid[i, j, k]
                        quads[q, 3] = vid[i - 1, j, k]
                    sides[q, 0] = a
                    sides[q, 1] = b
                    q += 1
    return quads[:q], sides[:q]


@nb.njit(cache=True)
def _cell_positions(vid, n):
    """Index-space position (of the unpadded grid) of each dual vertex: its cell centre."""
    pos = np.empty((n, 3), dtype=np.float64)
    nx, ny, nz = vid.shape
    for i in range(nx):
        for j in range(ny):
            for k in range(nz):
                v = vid[i, j, k]
                if v >= 0:
                    # padded (by 2) cell (i, j, k) spans padded voxels i..i+1 -> unpadded i-2..i-1
                    pos[v, 0] = i - 1.5
                    pos[v, 1] = j - 1.5
                    pos[v, 2] = k - 1.5
    return pos


@nb.njit(cache=True)
def _smooth_step(pos, out, indptr, indices, factor, centre, clamp):
    n = pos.shape[0]
    for v in range(n):
        a, b = indptr[v], indptr[v + 1]
        if b <= a:
            for d in range(3):
                out[v, d] = pos[v, d]
            continue
        for d in range(3):
            s = 0.0
            for e in range(a, b):
                s += pos[indices[e], d]
            m = s / (b - a)
            x = pos[v, d] + factor * (m - pos[v, d])
            lo = centre[v, d] - clamp
            hi = centre[v, d] + clamp
            if x < lo:
                x = lo
            elif x > hi:
                x = hi
            out[v, d] = x


def _adjacency(quads: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    e = np.concatenate([quads[:, [0, 1]], quads[:, [1, 2]], quads[:, [2, 3]], quads[:, [3, 0]]])
    e = np.concatenate([e, e[:, ::-1]]).astype(np.int64)
    key = np.unique(e[:, 0] * n + e[:, 1])
    src = key // n
    dst = key % n
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.add.at(indptr, src + 1, 1)
    np.cumsum(indptr, out=indptr)
    return indptr, dst.astype(np.int64)


def _triangulate(quads: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Split each quad along its shorter diagonal: (2Q, 3), faces 2q and 2q+1 come from quad q."""
    d02 = np.linalg.norm(pos[quads[:, 0]] - pos[quads[:, 2]], axis=1)
    d13 = np.linalg.norm(pos[quads[:, 1]] - pos[quads[:, 3]], axis=1)
    use02 = d02 <= d13
    t = np.empty((len(quads), 2, 3), dtype=np.int64)
    t[use02, 0] = quads[use02][:, [0, 1, 2]]
    t[use02, 1] = quads[use02][:, [0, 2, 3]]
    t[~use02, 0] = quads[~use02][:, [0, 1, 3]]
    t[~use02, 1] = quads[~use02][:, [1, 2, 3]]
    return t.reshape(-1, 3)


@dataclass
class SharedComplex:
    """All label surfaces of one label map: shared vertices, triangles with their two labels."""
    vertices: np.ndarray  # (N, 3) world mm
    triangles: np.ndarray  # (T, 3), wound with the normal pointing from sides[:, 0] to sides[:, 1]
    sides: np.ndarray  # (T, 2) labels on the inner / outer side
    voxel_volume_mm3: dict  # label -> voxel volume

    def label_faces(self, label: int) -> np.ndarray:
        """Faces of one label, wound outward (global vertex ids)."""
        a = self.triangles[self.sides[:, 0] == label]
        b = self.triangles[self.sides[:, 1] == label][:, ::-1]
        return np.concatenate([a, b])

    def label_volumes(self, vertices: np.ndarray | None = None) -> dict:
        """Signed enclosed volume per label (mm^3) for the given vertex positions."""
        v = self.vertices if vertices is None else vertices
        p = v[self.triangles]
        c = v.mean(axis=0)
        vol6 = np.einsum("ij,ij->i", p[:, 0] - c, np.cross(p[:, 1] - c, p[:, 2] - c))
        n = int(max(self.sides.max(initial=0), 0)) + 1
        tot = np.bincount(self.sides[:, 0], weights=vol6, minlength=n)
        tot -= np.bincount(self.sides[:, 1], weights=vol6, minlength=n)
        return {int(lab): float(tot[lab] / 6.0) for lab in self.voxel_volume_mm3}

    def mesh(self, label: int, name: str = "", manifold: bool = True) -> Mesh:
        """One label's closed mesh. ``meta['complex_vertex']`` maps its vertices to the shared ids.

        With ``manifold`` (default), vertices where pieces of the label touch only along an edge
        or at a point are split (``make_manifold``): same positions, 2-manifold result.
        """
        f = self.label_faces(label)
        used, inv = np.unique(f.reshape(-1), return_inverse=True)
        verts, faces = self.vertices[used], inv.reshape(-1, 3)
        src = np.arange(len(used))
        if manifold:
            verts, faces, src = make_manifold(verts, faces)
        return Mesh(verts, faces, name, {"label_id": int(label), "complex_vertex": used[src]})


def _world(pos_idx: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return pos_idx @ affine[:3, :3].T + affine[:3, 3]


def surface_nets(labels: np.ndarray, affine: np.ndarray, *, smooth_iterations: int = 10,
                 volume_tol: float = 0.015, max_triangles: int | None = None) -> SharedComplex:
    """Multi-label surface nets of an integer label array (0 = background), see module doc."""
    lab = np.ascontiguousarray(labels)
    if lab.dtype not in (np.uint8, np.uint16, np.int32, np.int16):
        lab = lab.astype(np.int32)
    affine = np.asarray(affine, dtype=np.float64)
    counts = np.bincount(lab.reshape(-1).astype(np.int64))
    vox = abs(float(np.linalg.det(affine[:3, :3])))
    present = [int(i) for i in np.flatnonzero(counts) if i != 0]
    if not present:
        raise CtwinError("label map has no labelled voxel to mesh")
    # Crop to the labelled bounding box (+1) to save time on large empty margins.
    nz = np.nonzero(lab)
    lo = np.array([x.min() for x in nz])
    hi = np.array([x.max() for x in nz]) + 1
    sub = lab[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    pad = np.pad(sub, 2).astype(np.int32)  # quads are emitted from padded index 1 on
    vid, n = _sn_vertices(pad)
    quads, sides = _sn_quads(pad, vid, n)
    centre = _cell_positions(vid, n)
    del vid
    pos = centre.copy()
    if smooth_iterations > 0:
        indptr, indices = _adjacency(quads, n)
        tmp = np.empty_like(pos)
        for _ in range(int(smooth_iterations)):
            _smooth_step(pos, tmp, indptr, indices, 0.5, centre, 0.5)
            _smooth_step(tmp, pos, indptr, indices, -0.53, centre, 0.5)
    tris = _triangulate(quads, pos)
    tsides = np.repeat(sides, 2, axis=0).astype(np.int64)
    flip = np.linalg.det(affine[:3, :3]) < 0
    if flip:  # a mirroring affine reverses windings: restore outward normals
        tris = tris[:, ::-1].copy()
    off = lo.astype(np.float64)
    cx = SharedComplex(_world(centre + off, affine), tris, tsides,
                       {lab_id: counts[lab_id] * vox for lab_id in present})
    if smooth_iterations > 0:
        smooth_w = _world(pos + off, affine)
        cx.vertices = _bound_volumes(cx, cx.vertices, smooth_w, volume_tol)
    if max_triangles is not None:
        cx = decimate_shared(cx, int(max_triangles))
    return cx


def _bound_volumes(cx: SharedComplex, exact: np.ndarray, smooth: np.ndarray, tol: float) -> np.ndarray:
    """Blend vertices back towards ``exact`` per label until every label is within ``tol``."""
    v0 = cx.voxel_volume_mm3
    labels_ = np.array(sorted(v0))
    nlab = int(labels_.max()) + 1
    t_lab = np.ones(nlab)
    # vertex -> labels touching it: via triangles
    vt = np.concatenate([cx.triangles.reshape(-1), cx.triangles.reshape(-1)])
    vl = np.concatenate([np.repeat(cx.sides[:, 0], 3), np.repeat(cx.sides[:, 1], 3)])
    keep = vl > 0
    vt, vl = vt[keep], vl[keep]
    n = len(exact)
    pos = smooth
    for _ in range(12):
        vols = cx.label_volumes(pos)
        bad = False
        for lab_id in labels_:
            dev = abs(vols[lab_id] - v0[lab_id]) / v0[lab_id]
            if dev > tol:
                bad = True
                t_lab[lab_id] *= max(0.0, min(0.9, 0.9 * tol / dev))
                if t_lab[lab_id] < 0.05:
                    t_lab[lab_id] = 0.0
        if not bad:
            return pos
        t_v = np.ones(n)
        np.minimum.at(t_v, vt, t_lab[vl])
        pos = exact + t_v[:, None] * (smooth - exact)
    # last resort: labels still outside the tolerance keep their voxel-exact surfaces
    vols = cx.label_volumes(pos)
    for lab_id in labels_:
        if abs(vols[lab_id] - v0[lab_id]) / v0[lab_id] > tol:
            t_lab[lab_id] = 0.0
    t_v = np.ones(n)
    np.minimum.at(t_v, vt, t_lab[vl])
    return exact + t_v[:, None] * (smooth - exact)


def decimate_shared(cx: SharedComplex, max_triangles: int) -> SharedComplex:
    """Vertex clustering of the shared complex down to at most ``max_triangles`` label triangles.

    The count is of label-mesh triangles (a triangle between two labels counts twice).
    """
    def n_label_tris(sides):
        return int(np.count_nonzero(sides[:, 0] > 0) + np.count_nonzero(sides[:, 1] > 0))

    if n_label_tris(cx.sides) <= max_triangles:
        return cx
    if max_triangles < 4 * len(cx.voxel_volume_mm3):
        raise CtwinError(f"triangle budget {max_triangles} is too small for {len(cx.voxel_volume_mm3)} structures")
    v = cx.vertices
    lo = v.min(axis=0)

    def cluster(h):
        key = np.floor((v - lo) / h).astype(np.int64)
        uniq, inv = np.unique(key, axis=0, return_inverse=True)
        inv = inv.reshape(-1)
        t = inv[cx.triangles]
        ok = (t[:, 0] != t[:, 1]) & (t[:, 1] != t[:, 2]) & (t[:, 0] != t[:, 2])
        return uniq, inv, t[ok], cx.sides[ok]

    span = float(np.max(v.max(axis=0) - lo))
    h_lo, h_hi = 1e-3, span
    best = None
    for _ in range(30):
        h = np.sqrt(h_lo * h_hi)
        uniq, inv, t, s = cluster(h)
        if n_label_tris(s) <= max_triangles:
            best = (inv, t, s)
            h_hi = h
        else:
            h_lo = h
        if h_hi / h_lo < 1.02 and best is not None:
            break
    inv, t, s = best
    nv = int(inv.max()) + 1
    cnt = np.bincount(inv, minlength=nv).astype(np.float64)
    nvert = np.stack([np.bincount(inv, weights=v[:, d], minlength=nv) for d in range(3)], axis=1) / np.maximum(cnt, 1)[:, None]
    out = SharedComplex(nvert, t, s, cx.voxel_volume_mm3)
    lost = [lab for lab in cx.voxel_volume_mm3 if not np.any(s == lab)]
    if lost:
        report(f"warning: decimation to {max_triangles} triangles removed {len(lost)} small structure(s)")
    return out


def label_meshes(labelmap: Volume, names: dict[int, str], *, smooth_iterations: int = 10,
                 volume_tol: float = 0.015, max_triangles: int | None = None) -> dict[str, Mesh]:
    """One closed mesh per label (LPS mm), neighbours sharing their boundary (see module doc)."""
    data = labelmap.data
    ids = [i for i in names if i != 0]
    known = np.zeros(int(max(int(data.max(initial=0)), max(ids, default=0))) + 1, dtype=bool)
    known[ids] = True
    lab = np.where(known[data], data, 0).astype(np.uint16) if not known[data].all() else data
    cx = surface_nets(lab, labelmap.affine, smooth_iterations=smooth_iterations,
                      volume_tol=volume_tol, max_triangles=max_triangles)
    out = {}
    for i in ids:
        if i not in cx.voxel_volume_mm3:
            report(f"warning: label {names[i]} has no voxels; no mesh")
            continue
        m = cx.mesh(i, names[i])
        if m.n_faces == 0:
            continue
        m.meta["voxel_volume_mm3"] = cx.voxel_volume_mm3[i]
        out[names[i]] = m
    return out


# --------------------------------------------------------------------------------------------
# Skin: body mask without the patient table


def _axial_axis(vol: Volume) -> int:
    return int(np.argmax(np.abs(vol.direction[2, :])))


def body_mask(ct: Volume, threshold_hu: float = -500.0, opening_mm: float = 6.0) -> np.ndarray:
    """Boolean body mask: HU > threshold, table and blankets removed, holes filled slice-wise.

    The table and blankets are thin structures that touch the body along thin bridges at most:
    an in-plane opening with a disk of radius ``opening_mm`` cuts them off, the largest 3-D
    component is the body, and the body's voxels lost to the opening are restored where they
    are within the opening radius of that component and not part of a separate thin structure.
    """
    from scipy import ndimage

    m = ct.data > threshold_hu
    if not m.any():
        raise CtwinError(f"CT has no voxel above {threshold_hu:.0f} HU: no body to mesh")
    ax = _axial_axis(ct)
    inplane = [a for a in range(3) if a != ax]
    sp = ct.spacing
    r = [max(1, int(round(opening_mm / sp[a]))) for a in inplane]
    yy, xx = np.mgrid[-r[0]:r[0] + 1, -r[1]:r[1] + 1]
    disk2 = (yy / r[0]) ** 2 + (xx / r[1]) ** 2 <= 1.0
    struct = np.expand_dims(disk2, ax)
    opened = ndimage.binary_opening(m, structure=struct)
    lab, n = ndimage.label(opened)
    if n == 0:
        raise CtwinError("CT body mask vanishes under the table-removal opening (body too thin?)")
    sizes = np.bincount(lab.reshape(-1))
    sizes[0] = 0
    body = lab == int(np.argmax(sizes))
    # restore the rim the opening shaved off the body (not the table: it was cut off entirely)
    near = ndimage.binary_dilation(body, structure=struct)
    rim = m & near & ~body
    other = opened & ~body
    rim &= ~ndimage.binary_dilation(other, structure=struct)
    body |= rim
    # fill holes slice by slice (lungs, bowel gas) in the axial planes
    body = np.moveaxis(body, ax, 0)
    for s in range(body.shape[0]):
        if body[s].any():
            body[s] = ndimage.binary_fill_holes(body[s])
    body = np.moveaxis(body, 0, ax)
    lab, n = ndimage.label(body)
    if n > 1:
        sizes = np.bincount(lab.reshape(-1))
        sizes[0] = 0
        body = lab == int(np.argmax(sizes))
    return np.ascontiguousarray(body)


def skin_mesh(ct: Volume, threshold_hu: float = -500.0, *, smooth_iterations: int = 10,
              max_triangles: int | None = None, mask: np.ndarray | None = None) -> Mesh:
    """The CT's skin surface (LPS mm): mesh of ``body_mask`` (table and blankets removed)."""
    body = body_mask(ct, threshold_hu) if mask is None else mask
    cx = surface_nets(body.astype(np.uint8), ct.affine, smooth_iterations=smooth_iterations,
                      max_triangles=max_triangles)
    from .labels import name_to_id

    m = cx.mesh(1, "skin")
    m.meta["label_id"] = int(name_to_id().get("skin", 0))
    m.meta["voxel_volume_mm3"] = cx.voxel_volume_mm3[1]
    return m


# --------------------------------------------------------------------------------------------
# The import step shared by the Blender operator and `ctwin build`


def import_anatomy(ct_path, seg_path, *, smooth_iterations: int = 10,
                   max_triangles: int | None = None):
    """Read a CT and its segmentation and mesh them.

    Returns ``(ct, labelmap, names, meshes, skin)``: the int16 HU CT Volume, the uint16 labelmap
    on the CT grid, id -> name, {name: Mesh} (closed, shared boundaries, LPS mm) and the skin
    Mesh. Nothing is written.
    """
    import time

    from .ct import load_ct
    from .segmentation import load_segmentation

    t0 = time.perf_counter()
    report("reading CT", 0.0)
    ct = load_ct(ct_path)
    report("reading segmentation", 0.15)
    labelmap, names = load_segmentation(seg_path, ct)
    report(f"meshing {len(names)} structures", 0.35)
    meshes = label_meshes(labelmap, names, smooth_iterations=smooth_iterations,
                          max_triangles=max_triangles)
    report("meshing skin", 0.75)
    skin = skin_mesh(ct, smooth_iterations=smooth_iterations)
    report(f"imported {len(meshes)} structures and the skin in {time.perf_counter() - t0:.1f} s", 1.0)
    return ct, labelmap, names, meshes, skin
