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
    are exact. Where voxels of one label touch only along an edge or at a corner, the raw surface
    is non-manifold; ``make_manifold`` splits those vertices per label mesh (same positions), so
    the label meshes are 2-manifold and watertight in trimesh's sense (0 non-manifold edges on
    the real CTs and the phantom; ``Mesh.nonmanifold_edges()`` counts any that remain).
    ``Mesh.meta['complex_vertex']`` maps each mesh vertex to its shared-complex vertex.

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
    decimation and meshes stay closed; it changes volumes (not re-bounded) and coarsens evenly
    (no curvature adaptivity); structures smaller than a cluster can vanish (reported).

Coordinates: vertices are LPS world mm (``labelmap.affine`` applied); faces are wound with
outward normals whatever the sign of the affine's determinant.

Skin: ``body_mask`` (HU > -500, table and blankets cut off, holes filled per axial slice) and
``skin_mesh``; see ``body_mask`` for how the table is found and what is not handled.

``import_anatomy`` also lives here (it needs the mesher);
a segmentation label named ``skin`` is returned by it under the key ``skin_label``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numba as nb
import numpy as np
from scipy import ndimage
import time

from ..errors import CtwinError
from ..progress import report
from ..volumes.volume import Volume, apply_transform
from ..fileio import atomic_path
from ..volumes.ct import load_ct
from ..volumes.labels import name_to_id
from ..volumes.segmentation import load_segmentation
# Imported where used, so that importing this module stays light: trimesh (heavy or optional third-party packages).


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


@nb.njit(cache=True)
def _pair_groups(vertices, faces, order, gstart, gcount, u, v, flip, out):
    """Pair the half-edges of each non-manifold edge (2k faces) geometrically.

    Faces around the edge are sorted by angle; consecutive faces of opposite direction are
    paired. Of the two possible pairings the default one pairs faces that bound wedges of the
    solid (outward normals pointing away from the wedge), so pieces touching only along the
    edge come apart; ``flip[g]`` takes the other pairing. Writes pairs to ``out``; returns count.
    """
    nout = 0
    for g in range(gstart.shape[0]):
        s0 = gstart[g]
        k = gcount[g]
        h0 = order[s0]
        a = min(u[h0], v[h0])
        b = max(u[h0], v[h0])
        e = vertices[b] - vertices[a]
        e = e / max(np.sqrt((e * e).sum()), 1e-12)
        ref = np.array([1.0, 0.0, 0.0]) if abs(e[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
        x = np.cross(e, ref)
        x = x / np.sqrt((x * x).sum())
        y = np.cross(e, x)
        hs = np.empty(k, np.int64)
        ang = np.empty(k)
        for i in range(k):
            h = order[s0 + i]
            hs[i] = h
            f = h // 3
            w = faces[f, (h % 3 + 2) % 3]
            d = vertices[w] - vertices[a]
            ang[i] = np.arctan2((d * y).sum(), (d * x).sum())
        idx = np.argsort(ang)
        hs = hs[idx]
        ang = ang[idx]
        best_s = -1
        best_score = -1
        alt_s = -1
        for s in range(2):
            ok = True
            score = 0
            for i in range(s, s + k, 2):
                i0 = i % k
                i1 = (i + 1) % k
                f0 = (u[hs[i0]] == a)
                f1 = (u[hs[i1]] == a)
                if f0 == f1:
                    ok = False
                    break
                gap = (ang[i1] - ang[i0]) % (2 * np.pi)
                mid = ang[i0] + 0.5 * gap
                m = np.cos(mid) * x + np.sin(mid) * y
                solid = True
                for hh in (hs[i0], hs[i1]):
                    t = faces[hh // 3]
                    nrm = np.cross(vertices[t[1]] - vertices[t[0]], vertices[t[2]] - vertices[t[0]])
                    if (m * nrm).sum() >= 0:
                        solid = False
                if solid:
                    score += 1
            if ok:
                if score > best_score:
                    alt_s = best_s
                    best_s, best_score = s, score
                else:
                    alt_s = s
        use = alt_s if (flip[g] and alt_s >= 0) else best_s
        if use < 0:
            # degenerate geometry (e.g. after decimation): pair forward with reverse half-edges
            # in angular order, which keeps the surface closed and consistently oriented
            fw = np.empty(k, np.int64)
            rv = np.empty(k, np.int64)
            nfw = 0
            nrv = 0
            for i in range(k):
                if u[hs[i]] == a:
                    fw[nfw] = hs[i]
                    nfw += 1
                else:
                    rv[nrv] = hs[i]
                    nrv += 1
            for i in range(min(nfw, nrv)):
                out[nout, 0] = fw[i]
                out[nout, 1] = rv[i]
                nout += 1
            continue
        for i in range(use, use + k, 2):
            out[nout, 0] = hs[i % k]
            out[nout, 1] = hs[(i + 1) % k]
            nout += 1
    return nout


@nb.njit(cache=True)
def _uf_find(parent, x):
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


@nb.njit(cache=True)
def _corner_uf(n, pairs):
    """Union-find over face corners joined across paired half-edges: (ncomp, comp)."""
    parent = np.arange(n)
    for e in range(pairs.shape[0]):
        a = pairs[e, 0]
        b = pairs[e, 1]
        fa, ca, fb, cb = a // 3, a % 3, b // 3, b % 3
        # corner of u(a) in a's face ~ the same vertex's corner in b's face (likewise for v(a))
        for x, y in ((3 * fa + ca, 3 * fb + (cb + 1) % 3), (3 * fa + (ca + 1) % 3, 3 * fb + cb)):
            rx = _uf_find(parent, x)
            ry = _uf_find(parent, y)
            if rx != ry:
                if rx < ry:
                    parent[ry] = rx
                else:
                    parent[rx] = ry
    comp = np.empty(n, np.int64)
    label = np.full(n, -1, np.int64)
    ncomp = 0
    for i in range(n):
        r = _uf_find(parent, i)
        if label[r] < 0:
            label[r] = ncomp
            ncomp += 1
        comp[i] = label[r]
    return ncomp, comp


@nb.njit(cache=True)
def _compact(flat, nv):
    """Vertex ids used by ``flat`` (in first-use order) and ``flat`` renumbered to them."""
    m = np.full(nv, -1, np.int64)
    used = np.empty(flat.shape[0], np.int64)
    out = np.empty(flat.shape[0], np.int64)
    n = 0
    for i in range(flat.shape[0]):
        v = flat[i]
        if m[v] < 0:
            m[v] = n
            used[n] = v
            n += 1
        out[i] = m[v]
    return used[:n], out


def _corner_components(nf, pairs):
    return _corner_uf(3 * nf, np.ascontiguousarray(pairs, dtype=np.int64))


def _overshared(comp, ncomp) -> np.ndarray:
    """Per corner: is the edge starting at this corner used by more than two faces?"""
    cf = comp.reshape(-1, 3).astype(np.int64)
    e = np.sort(np.stack([cf.reshape(-1), cf[:, [1, 2, 0]].reshape(-1)], axis=1), axis=1)
    _, inv, cnt = np.unique(e[:, 0] * (ncomp + 1) + e[:, 1], return_inverse=True, return_counts=True)
    return cnt[inv] > 2


def make_manifold(vertices: np.ndarray, faces: np.ndarray):
    """Split vertices so that a closed oriented surface becomes 2-manifold.

    Every edge ends up in exactly two faces and every vertex has one fan of faces; where pieces
    touched only along an edge or at a vertex, they get their own copies of those vertices (same
    positions). Triangles and volume are unchanged. Where both ends of a non-manifold edge stay
    one fan, the edge is paired the other way (the pieces join across it); the rare edges that
    stay non-manifold after that are left as they are (still closed). Returns (vertices, faces,
    source vertex ids).
    """
    faces = np.asarray(faces, dtype=np.int64)
    vertices = np.ascontiguousarray(vertices, dtype=np.float64)
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
    base = np.stack([h1[ok], h2[ok]], axis=1)
    gstart = starts[counts > 2].astype(np.int64)
    gcount = counts[counts > 2].astype(np.int64)

    def split(flip):
        out = np.empty((int(gcount.sum()) // 2 + 1, 2), np.int64)
        k = _pair_groups(vertices, faces, order, gstart, gcount, u, v, flip, out) if len(gstart) else 0
        return _corner_components(nf, np.concatenate([base, out[:k]]))

    ncomp, comp = split(np.zeros(len(gstart), np.bool_))
    if len(gstart):
        still = _overshared(comp, ncomp)
        if still.any():
            # groups with a half-edge (= corner id) still over-shared
            grp = np.repeat(np.arange(len(gstart)), gcount)
            members = order[np.concatenate([np.arange(s, s + c) for s, c in zip(gstart, gcount)])]
            flip = np.zeros(len(gstart), np.bool_)
            flip[np.unique(grp[still[members]])] = True
            ncomp2, comp2 = split(flip)
            if np.count_nonzero(_overshared(comp2, ncomp2)) < np.count_nonzero(still):
                ncomp, comp = ncomp2, comp2
    source = np.empty(ncomp, dtype=np.int64)
    source[comp] = u
    return vertices[source], comp.reshape(-1, 3).astype(np.int64), source


def write_ply(mesh: Mesh, path) -> None:
    """Write a binary little-endian PLY (float32 x y z in mm, uchar-count int32 faces), atomically."""
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
        key = (id(self.triangles), id(self.sides))
        cache = getattr(self, "_by_label", None)
        if cache is None or cache[0] != key:
            lab = np.concatenate([self.sides[:, 0], self.sides[:, 1]])
            order = np.argsort(lab, kind="stable")
            bounds = np.searchsorted(lab[order], np.arange(int(lab.max(initial=0)) + 2))
            cache = self._by_label = (key, order, bounds)
        _, order, bounds = cache
        if label < 0 or label + 1 >= len(bounds):
            return np.zeros((0, 3), np.int64)
        sel = order[bounds[label]:bounds[label + 1]]
        nt = len(self.triangles)
        first = sel[sel < nt]
        second = sel[sel >= nt] - nt
        return np.concatenate([self.triangles[first], self.triangles[second][:, ::-1]])

    def label_volumes(self, vertices: np.ndarray | None = None) -> dict:
        """Signed enclosed volume per label (mm^3) for the given vertex positions."""
        v = np.ascontiguousarray(self.vertices if vertices is None else vertices, dtype=np.float64)
        n = int(max(self.sides.max(initial=0), 0)) + 1
        tot = _label_volumes6(v, self.triangles, self.sides, n, v.mean(axis=0))
        return {int(lab): float(tot[lab] / 6.0) for lab in self.voxel_volume_mm3}

    def mesh(self, label: int, name: str = "", manifold: bool = True) -> Mesh:
        """One label's closed mesh. ``meta['complex_vertex']`` maps its vertices to the shared ids.

        With ``manifold`` (default), vertices where pieces of the label touch only along an edge
        or at a point are split (``make_manifold``): same positions, 2-manifold result.
        """
        f = self.label_faces(label)
        used, inv = _compact(np.ascontiguousarray(f.reshape(-1), dtype=np.int64), len(self.vertices))
        verts, faces = self.vertices[used], inv.reshape(-1, 3)
        src = np.arange(len(used))
        if manifold:
            verts, faces, src = make_manifold(verts, faces)
        return Mesh(verts, faces, name, {"label_id": int(label), "complex_vertex": used[src]})


@nb.njit(cache=True)
def _label_volumes6(v, tris, sides, n, c):
    """6 x signed volume per label: sum of det(p0-c, p1-c, p2-c), + on side 0, - on side 1."""
    tot = np.zeros(n)
    for t in range(tris.shape[0]):
        a0 = v[tris[t, 0], 0] - c[0]
        a1 = v[tris[t, 0], 1] - c[1]
        a2 = v[tris[t, 0], 2] - c[2]
        b0 = v[tris[t, 1], 0] - c[0]
        b1 = v[tris[t, 1], 1] - c[1]
        b2 = v[tris[t, 1], 2] - c[2]
        d0 = v[tris[t, 2], 0] - c[0]
        d1 = v[tris[t, 2], 1] - c[1]
        d2 = v[tris[t, 2], 2] - c[2]
        det = a0 * (b1 * d2 - b2 * d1) - a1 * (b0 * d2 - b2 * d0) + a2 * (b0 * d1 - b1 * d0)
        tot[sides[t, 0]] += det
        tot[sides[t, 1]] -= det
    return tot


@nb.njit(cache=True)
def _vertex_min_t(tris, sides, t_lab, nv):
    """Per vertex: the smallest blend factor of the labels (> 0) whose surfaces use it."""
    t_v = np.ones(nv)
    for t in range(tris.shape[0]):
        for s in range(2):
            lab = sides[t, s]
            if lab <= 0:
                continue
            f = t_lab[lab]
            for c in range(3):
                if f < t_v[tris[t, c]]:
                    t_v[tris[t, c]] = f
    return t_v


def _world(pos_idx: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return apply_transform(affine, pos_idx)


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
    lo, hi = np.zeros(3, np.int64), np.zeros(3, np.int64)
    for ax in range(3):
        occ = np.flatnonzero(np.any(lab != 0, axis=tuple(a for a in range(3) if a != ax)))
        lo[ax], hi[ax] = occ[0], occ[-1] + 1
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
        t_v = _vertex_min_t(cx.triangles, cx.sides, t_lab, n)
        pos = exact + t_v[:, None] * (smooth - exact)
    # last resort: labels still outside the tolerance keep their voxel-exact surfaces
    vols = cx.label_volumes(pos)
    for lab_id in labels_:
        if abs(vols[lab_id] - v0[lab_id]) / v0[lab_id] > tol:
            t_lab[lab_id] = 0.0
    t_v = _vertex_min_t(cx.triangles, cx.sides, t_lab, n)
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
        dims = key.max(axis=0) + 1
        flat = (key[:, 0] * dims[1] + key[:, 1]) * dims[2] + key[:, 2]
        uniq, inv = np.unique(flat, return_inverse=True)
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


# Soft tissue in HU: adipose tissue -190 to -30 HU and skeletal muscle -29 to 150 HU
# (Mitsiopoulos et al., J Appl Physiol 1998;85:115-122).
SOFT_TISSUE_HU = (-190.0, 150.0)


def body_mask(ct: Volume, threshold_hu: float = -500.0, opening_mm: float = 6.0) -> np.ndarray:
    """Boolean body mask: HU > threshold, table and blankets removed, holes filled slice-wise.

    The table and blankets are thin structures, or touch the body along thin bridges only: an
    in-plane opening with a disk of radius ``opening_mm`` cuts them off and the largest 3-D
    component is the body (with any other bulky component, e.g. an arm apart from the trunk). Pieces the opening shaved off are given back when they lie wholly
    within the opening radius of the body (skin details), not when they extend beyond it (a pad
    or blanket lying against the body). A flat table top under the body is cut by its rows
    (``_cut_flat_table``), sparing the body's own skin layer lying in them. Not handled: a thick
    table fused to the body over a wide contact with no lower-HU layer between them.
    """
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
    body = _body_components(lab, n, ct, ax)
    # Restore what the opening shaved off the body itself: pieces of (mask - body) that lie
    # wholly within the opening radius of the body. A table pad or blanket touching the body
    # extends beyond that radius (it is wider than the body's contact) and stays out.
    near = ndimage.binary_dilation(body, structure=struct)
    rest_lab, nrest = ndimage.label(m & ~body)
    if nrest:
        total = np.bincount(rest_lab.reshape(-1), minlength=nrest + 1)
        close = np.bincount(rest_lab[near].reshape(-1), minlength=nrest + 1)
        keep = (close == total)
        keep[0] = False
        body |= keep[rest_lab]
        table = ~keep[rest_lab] & (rest_lab > 0)
        _cut_flat_table(body, table, ct, ax)
    # fill holes slice by slice (lungs, bowel gas) in the axial planes
    body = np.moveaxis(body, ax, 0)
    for s in range(body.shape[0]):
        if body[s].any():
            body[s] = ndimage.binary_fill_holes(body[s])
    body = np.moveaxis(body, 0, ax)
    lab, n = ndimage.label(body)
    if n > 1:
        body = _body_components(lab, n, ct, ax)
    return np.ascontiguousarray(body)


def _body_components(lab: np.ndarray, n: int, ct: Volume, ax: int,
                     min_fraction: float = 0.05, min_ap_mm: float = 40.0) -> np.ndarray:
    """The largest component, plus any other bulky one (an arm apart from the trunk): at least
    ``min_fraction`` of the largest's voxels and ``min_ap_mm`` thick front to back (table
    pieces are flat)."""
    sizes = np.bincount(lab.reshape(-1), minlength=n + 1)
    sizes[0] = 0
    big = int(np.argmax(sizes))
    keep = np.zeros(n + 1, bool)
    keep[big] = True
    cand = np.flatnonzero(sizes >= min_fraction * sizes[big])
    if len(cand) > 1:
        inplane = [a for a in range(3) if a != ax]
        yax = inplane[int(np.argmax([abs(ct.direction[1, a]) for a in inplane]))]
        sl = ndimage.find_objects(lab)
        for c in cand:
            if c == big or sl[c - 1] is None:
                continue
            s = sl[c - 1][yax]
            if (s.stop - s.start) * ct.spacing[yax] >= min_ap_mm:
                keep[c] = True
    return keep[lab]


def _cut_flat_table(body: np.ndarray, table: np.ndarray, ct: Volume, ax: int,
                    flat_mm: float = 10.0, min_width_mm: float = 100.0) -> None:
    """Remove a flat table top that the body lies on directly (in place).

    Per axial slice: the anterior-most row in which the thin structures cut off beside the body
    (``table``) span at least ``min_width_mm``, and the rows within ``flat_mm`` posterior of it,
    are the table top when no body voxel lies posterior of them; body voxels in those rows are
    table, not patient, except the body's own surface layer lying on the table: per column, a
    run of soft-tissue voxels (``SOFT_TISSUE_HU``) continuing the body into those rows that ends
    at another HU (a pad, the table shell, air) before the band does. A curved table (its top
    rows are its raised sides, with the body reaching further posterior) is left to the opening.
    """
    inplane = [a for a in range(3) if a != ax]
    d = ct.direction
    yax = inplane[int(np.argmax([abs(d[1, a]) for a in inplane]))]
    xax = inplane[0] if inplane[1] == yax else inplane[1]
    post_sign = np.sign(d[1, yax])  # +1: increasing index is posterior
    sp_y, sp_x = ct.spacing[yax], ct.spacing[xax]
    b = np.transpose(body, (ax, xax, yax))  # a view: writes go to ``body``
    t = np.transpose(table, (ax, xax, yax))
    h = np.transpose(ct.data, (ax, xax, yax))
    nband = max(1, int(np.floor(flat_mm / sp_y)))
    for s in np.flatnonzero(t.any(axis=(1, 2))):
        # the table's top: its anterior-most row that spans min_width_mm, and the rows
        # within flat_mm posterior of it
        wide = np.flatnonzero(t[s].sum(axis=0) * sp_x >= min_width_mm)
        if wide.size == 0:
            continue
        if post_sign > 0:
            rows = np.arange(wide[0], min(wide[0] + nband, t.shape[2]))
        else:
            rows = np.arange(max(wide[-1] - nband + 1, 0), wide[-1] + 1)
        brows = np.flatnonzero(b[s].any(axis=0))
        if brows.size == 0:
            continue
        beyond = brows > rows[-1] if post_sign > 0 else brows < rows[0]
        if beyond.any():  # body posterior of the "table": it is not a table under the body
            continue
        # The body's own surface layer in the band: per column, the run of soft-tissue voxels
        # from the body's side of the band that ends at another HU (a pad, the table shell, air)
        # within the band. A run that fills the band is the table itself.
        band = rows if post_sign > 0 else rows[::-1]  # from the body's side outwards
        above = band[0] - int(post_sign)
        bs = b[s]
        hu = h[s][:, band]
        run = np.logical_and.accumulate((hu >= SOFT_TISSUE_HU[0]) & (hu <= SOFT_TISSUE_HU[1]), axis=1)
        if 0 <= above < bs.shape[1]:
            run &= bs[:, above][:, None]  # it continues the body
        else:
            run[:] = False
        run &= ~run[:, -1:]  # the run stops inside the band
        bs[:, band] &= run


def skin_mesh(ct: Volume, threshold_hu: float = -500.0, *, smooth_iterations: int = 10,
              max_triangles: int | None = None, mask: np.ndarray | None = None) -> Mesh:
    """The CT's skin surface (LPS mm): mesh of ``body_mask`` (table and blankets removed)."""
    body = body_mask(ct, threshold_hu) if mask is None else mask
    cx = surface_nets(body.astype(np.uint8), ct.affine, smooth_iterations=smooth_iterations,
                      max_triangles=max_triangles)

    m = cx.mesh(1, "skin")
    m.meta["label_id"] = int(name_to_id().get("skin", 0))
    m.meta["voxel_volume_mm3"] = cx.voxel_volume_mm3[1]
    return m


# --------------------------------------------------------------------------------------------
# The import step shared by the Blender operator and `ctwin build`


SKIN_LABEL_KEY = "skin_label"


def import_anatomy(ct_path, seg_path, *, smooth_iterations: int = 10,
                   max_triangles: int | None = None, check=None):
    """Read a CT and its segmentation and mesh them.

    Returns ``(ct, labelmap, names, meshes, skin)``: the int16 HU CT Volume, the uint16 labelmap
    on the CT grid, id -> name, {name: Mesh} (closed, shared boundaries, LPS mm) and the skin
    Mesh. Nothing is written. ``check(ct, labelmap, names)``, when given, runs before the meshing
    (the build's plausibility check). The name ``skin`` belongs to the CT skin surface (SPEC: meshes/
    skin.ply); a segmentation label called ``skin`` (a skin-tissue shell, as in the phantom) is
    returned under the key ``skin_label`` (its ``meta['label_name']`` is ``skin``).
    """
    t0 = time.perf_counter()
    report("reading CT", 0.0)
    ct = load_ct(ct_path)
    report("reading segmentation", 0.15)
    labelmap, names = load_segmentation(seg_path, ct)
    if check is not None:
        check(ct, labelmap, names)
    report(f"meshing {len(names)} structures", 0.35)
    meshes = label_meshes(labelmap, names, smooth_iterations=smooth_iterations,
                          max_triangles=max_triangles)
    if "skin" in meshes:  # a skin-tissue label: keep the name "skin" for the CT skin surface
        m = meshes.pop("skin")
        m.name = SKIN_LABEL_KEY
        m.meta["label_name"] = "skin"
        meshes[SKIN_LABEL_KEY] = m
    report("meshing skin", 0.75)
    skin = skin_mesh(ct, smooth_iterations=smooth_iterations)
    report(f"imported {len(meshes)} structures and the skin in {time.perf_counter() - t0:.1f} s", 1.0)
    return ct, labelmap, names, meshes, skin
