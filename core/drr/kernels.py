"""DRR kernels: one body per ray, compiled for the CPU (numba parallel) and for CUDA (numba-cuda).

The per-ray functions below are plain Python on scalars and arrays. ``_build(decorate)`` makes a
fresh copy of each with a namespace in which the names of the other per-ray functions refer to
compiled versions: ``numba.njit`` for the CPU, ``numba.cuda.jit(device=True)`` for CUDA. So the CPU
and the GPU run the same code; only the drivers differ (a ``prange`` loop over pixels versus one
CUDA thread per pixel).

Conventions (see core/drr/projector.py for the host side):
- A volume is a flat int16 array (C order, index (i, j, k), k fastest): HU, or float16 mu bit
  patterns viewed as int16 (one compiled specialisation for both). Values reach mu either through the linear SPEC 5 map
  (``lin_a`` != 0: HU clamped at ``lin_lo`` = -1000 is interpolated, then mu = a HU + b, which equals
  interpolating the clipped mu exactly) or through a float32 table ``lut`` of 65536 entries indexed
  by the 16-bit pattern (float16 mu, material tables of the polyenergetic model).
- ``M`` (12 float64) maps world mm to continuous voxel index: p = M[0:3,0:3] x + M[0:3,3].
- The volume fills index space [-0.5, n - 0.5]; mu = 0 outside. Inside, positions are clamped to
  [0, n - 1] and interpolated trilinearly: nearest-voxel values between the outermost voxel
  centres and the faces, trilinear elsewhere (SPEC 5). Each corner goes through the table before
  interpolation (mu is interpolated, not HU).
- Rays are parametrised by arc length t (mm) from their origin; a ray runs over [0, tlen].
- Write ray loops with one exit (their condition) and if/else bodies, not ``continue``/``break``:
  on a GPU, the early exits of the trilinear and Siddon loops kept a warp's threads apart for the
  rest of the loop (1.3 of 32 active per instruction, kernels 16-18x slower; measured on an H200).
  ``ray_exact`` (22 of 32 active with its two ``continue``) and ``ray_scene`` (the per-sample posed
  kernel, not the default path) still have early exits; measure before relying on them on a GPU.
"""
from __future__ import annotations

import math
import types

import numpy as np
# Imported where used, so that importing this module stays light: numba (heavy or optional third-party packages).

MAX_CAND = 64  # rigid sub-volumes a single ray may cross (render_scene)
BLOCK = 8  # edge of the empty-space blocks, in voxels (a compile-time constant)
FINE = 2  # edge of the fine air blocks that scene composition tests rest points against


# ----------------------------------------------------------------------------------------------
# per-ray functions (shared by the CPU and CUDA builds)
# ----------------------------------------------------------------------------------------------
def pixel_ray(geo, r, c):
    """Origin, unit direction and length of the ray of pixel (row r, column c)."""
    W = geo[14]
    H = geo[15]
    a = (c - (W - 1.0) * 0.5) * geo[12]
    b = (r - (H - 1.0) * 0.5) * geo[13]
    px = geo[3] + a * geo[6] + b * geo[9]
    py = geo[4] + a * geo[7] + b * geo[10]
    pz = geo[5] + a * geo[8] + b * geo[11]
    if geo[16] > 0.5:
        dx = geo[17]
        dy = geo[18]
        dz = geo[19]
        tlen = (px - geo[0]) * dx + (py - geo[1]) * dy + (pz - geo[2]) * dz
        return px - tlen * dx, py - tlen * dy, pz - tlen * dz, dx, dy, dz, tlen
    dx = px - geo[0]
    dy = py - geo[1]
    dz = pz - geo[2]
    tlen = math.sqrt(dx * dx + dy * dy + dz * dz)
    return geo[0], geo[1], geo[2], dx / tlen, dy / tlen, dz / tlen, tlen


def to_index(M, x, y, z):
    return (M[0] * x + M[1] * y + M[2] * z + M[3],
            M[4] * x + M[5] * y + M[6] * z + M[7],
            M[8] * x + M[9] * y + M[10] * z + M[11])


def slab(p, d, n, t0, t1):
    """Clip [t0, t1] to the slab -0.5 <= p + t d <= n - 0.5 along one axis."""
    lo = -0.5
    hi = n - 0.5
    if d == 0.0:
        if p < lo or p > hi:
            return 1.0, 0.0
        return t0, t1
    ta = (lo - p) / d
    tb = (hi - p) / d
    if ta > tb:
        tmp = ta
        ta = tb
        tb = tmp
    if ta > t0:
        t0 = ta
    if tb < t1:
        t1 = tb
    return t0, t1


def ray_box(M, nx, ny, nz, ox, oy, oz, dx, dy, dz, t0, t1):
    """Interval of the ray inside the volume's cell box (empty if t0 >= t1), and the ray in index space."""
    px, py, pz = to_index(M, ox, oy, oz)
    qx = M[0] * dx + M[1] * dy + M[2] * dz
    qy = M[4] * dx + M[5] * dy + M[6] * dz
    qz = M[8] * dx + M[9] * dy + M[10] * dz
    t0, t1 = slab(px, qx, nx, t0, t1)
    t0, t1 = slab(py, qy, ny, t0, t1)
    t0, t1 = slab(pz, qz, nz, t0, t1)
    return t0, t1, px, py, pz, qx, qy, qz


def raw_val(pat, lut, lin_a, lin_lo):
    """Interpolation value of one stored voxel: HU clamped at ``lin_lo`` (linear mode, lin_a != 0)
    or mu from the table (indexed by the 16-bit pattern)."""
    if lin_a != 0.0:
        v = float(pat)
        return v if v > lin_lo else lin_lo
    return lut[int(pat) & 0xFFFF]   # int(): a NumPy 2 int16 scalar (CUDA simulator) refuses & 0xFFFF


def finish(v, lin_a, lin_b):
    """Interpolated value -> mu. In linear mode mu = a HU + b is exact after interpolation, because
    HU clamped at lin_lo (where mu reaches 0) keeps mu linear in HU: clamping then interpolating
    HU equals interpolating the clipped mu."""
    if lin_a != 0.0:
        return lin_a * v + lin_b
    return v


def lerp3(c000, c001, c010, c011, c100, c101, c110, c111, fx, fy, fz):
    """The trilinear blend of a cell's corner values c_ijk at fractions (fx, fy, fz) (along k
    first, then j, then i): the one interpolation formula of every kernel here and of
    ``core.twin.articulated``'s point sampler."""
    c00 = c000 + (c001 - c000) * fz
    c01 = c010 + (c011 - c010) * fz
    c10 = c100 + (c101 - c100) * fz
    c11 = c110 + (c111 - c110) * fz
    c0 = c00 + (c01 - c00) * fy
    c1 = c10 + (c11 - c10) * fy
    return c0 + (c1 - c0) * fx


def trilinear(data, lut, lin_a, lin_b, lin_lo, off, nx, ny, nz, x, y, z):
    """mu at continuous index (x, y, z), assumed inside the cell box (clamped to the centres)."""
    if x < 0.0:
        x = 0.0
    if x > nx - 1.0:
        x = nx - 1.0
    if y < 0.0:
        y = 0.0
    if y > ny - 1.0:
        y = ny - 1.0
    if z < 0.0:
        z = 0.0
    if z > nz - 1.0:
        z = nz - 1.0
    i = int(x)
    j = int(y)
    k = int(z)
    return trilinear_ijk(data, lut, lin_a, lin_b, lin_lo, off, nx, ny, nz, i, j, k, x - i, y - j, z - k)


def trilinear_ijk(data, lut, lin_a, lin_b, lin_lo, off, nx, ny, nz, i, j, k, fx, fy, fz):
    si = ny * nz
    sj = nz
    di = si if i < nx - 1 else 0
    dj = sj if j < ny - 1 else 0
    dk = 1 if k < nz - 1 else 0
    b = off + i * si + j * sj + k
    c000 = raw_val(data[b], lut, lin_a, lin_lo)
    c001 = raw_val(data[b + dk], lut, lin_a, lin_lo)
    c010 = raw_val(data[b + dj], lut, lin_a, lin_lo)
    c011 = raw_val(data[b + dj + dk], lut, lin_a, lin_lo)
    c100 = raw_val(data[b + di], lut, lin_a, lin_lo)
    c101 = raw_val(data[b + di + dk], lut, lin_a, lin_lo)
    c110 = raw_val(data[b + di + dj], lut, lin_a, lin_lo)
    c111 = raw_val(data[b + di + dj + dk], lut, lin_a, lin_lo)
    return finish(lerp3(c000, c001, c010, c011, c100, c101, c110, c111, fx, fy, fz), lin_a, lin_b)


def block_exit(px, py, pz, qx, qy, qz, bi, bj, bk, bs):
    """Arc length (from the index-space origin p) at which the ray leaves block (bi, bj, bk)."""
    te = 1e30
    if qx > 0.0:
        te = min(te, ((bi + 1) * bs - px) / qx)
    elif qx < 0.0:
        te = min(te, (bi * bs - px) / qx)
    if qy > 0.0:
        te = min(te, ((bj + 1) * bs - py) / qy)
    elif qy < 0.0:
        te = min(te, (bj * bs - py) / qy)
    if qz > 0.0:
        te = min(te, ((bk + 1) * bs - pz) / qz)
    elif qz < 0.0:
        te = min(te, (bk * bs - pz) / qz)
    return te


def ray_trilinear(data, lut, lin_a, lin_b, lin_lo, nx, ny, nz, M, occ, ox, oy, oz, dx, dy, dz, tlen, step):
    """Midpoint-rule integral of trilinear mu along one ray, skipping empty blocks.

    Samples sit at t0 + (m + 0.5) h, h = (t1 - t0) / ceil((t1 - t0) / step), so the clipped
    interval is covered exactly; skipping jumps over samples of BLOCK^3 blocks in which every
    sample is 0 (see projector.occupancy_grid), which leaves the sum unchanged.
    """
    t0, t1, px, py, pz, qx, qy, qz = ray_box(M, nx, ny, nz, ox, oy, oz, dx, dy, dz, 0.0, tlen)
    if t1 <= t0:
        return 0.0
    nsteps = int(math.ceil((t1 - t0) / step))
    if nsteps < 1:
        nsteps = 1
    h = (t1 - t0) / nsteps
    ony = (ny + BLOCK - 1) // BLOCK
    onz = (nz + BLOCK - 1) // BLOCK
    xm = nx - 1.0
    ym = ny - 1.0
    zm = nz - 1.0
    si = ny * nz
    sj = nz
    lastb = -1
    c000 = 0.0
    c001 = 0.0
    c010 = 0.0
    c011 = 0.0
    c100 = 0.0
    c101 = 0.0
    c110 = 0.0
    c111 = 0.0
    acc = 0.0
    last = -1
    m = 0
    # One exit and no continue: on a GPU, a loop whose iterations may end early (continue/break)
    # lets a warp's threads drift apart until the loop ends (measured: 1.3 of 32 threads active per
    # instruction), while if/else bodies reconverge every iteration.
    while m < nsteps:
        t = t0 + (m + 0.5) * h
        x = px + t * qx
        y = py + t * qy
        z = pz + t * qz
        inside = True
        if x < 0.0:
            x = 0.0
            inside = False
        elif x > xm:
            x = xm
            inside = False
        if y < 0.0:
            y = 0.0
            inside = False
        elif y > ym:
            y = ym
            inside = False
        if z < 0.0:
            z = 0.0
            inside = False
        elif z > zm:
            z = zm
            inside = False
        i = int(x)
        j = int(y)
        k = int(z)
        bi = i // BLOCK
        bj = j // BLOCK
        bk = k // BLOCK
        bid = (bi * ony + bj) * onz + bk
        skip_to = -1
        if bid != last:
            last = bid
            if occ[bid] == 0 and inside:
                te = block_exit(px, py, pz, qx, qy, qz, bi, bj, bk, BLOCK)
                skip_to = int(math.ceil((te - t0) / h - 0.5))
        if skip_to > m:
            m = skip_to
            last = -1
        else:
            b = i * si + j * sj + k
            if b != lastb:  # a new cell: load its 8 corners (consecutive samples often share a cell)
                lastb = b
                di = si if i < nx - 1 else 0
                dj = sj if j < ny - 1 else 0
                dk = 1 if k < nz - 1 else 0
                c000 = finish(raw_val(data[b], lut, lin_a, lin_lo), lin_a, lin_b)
                c001 = finish(raw_val(data[b + dk], lut, lin_a, lin_lo), lin_a, lin_b)
                c010 = finish(raw_val(data[b + dj], lut, lin_a, lin_lo), lin_a, lin_b)
                c011 = finish(raw_val(data[b + dj + dk], lut, lin_a, lin_lo), lin_a, lin_b)
                c100 = finish(raw_val(data[b + di], lut, lin_a, lin_lo), lin_a, lin_b)
                c101 = finish(raw_val(data[b + di + dk], lut, lin_a, lin_lo), lin_a, lin_b)
                c110 = finish(raw_val(data[b + di + dj], lut, lin_a, lin_lo), lin_a, lin_b)
                c111 = finish(raw_val(data[b + di + dj + dk], lut, lin_a, lin_lo), lin_a, lin_b)
            # x, y, z are clamped already, so corner_eval's clamp changes nothing
            acc += corner_eval(c000, c001, c010, c011, c100, c101, c110, c111, i, j, k, nx, ny, nz, x, y, z)
            m += 1
    return acc * h


def first_break(p, q, n):
    """(t of the first integer index plane in [0, n - 1] ahead of p along q (per unit q), the plane
    index, the plane step) for incremental traversal; t = 1e300 when there is none."""
    if q > 0.0:
        nb = math.floor(p) + 1.0
        if nb > n - 1.0:
            return 1e300, nb, 1.0
        return (nb - p) / q, nb, 1.0
    if q < 0.0:
        nb = math.ceil(p) - 1.0
        if nb < 0.0:
            return 1e300, nb, -1.0
        return (nb - p) / q, nb, -1.0
    return 1e300, 0.0, 0.0


def corner_eval(c000, c001, c010, c011, c100, c101, c110, c111, i, j, k, nx, ny, nz, x, y, z):
    """Trilinear polynomial of the cell (i, j, k) at (x, y, z), coordinates clamped to [0, n - 1]."""
    x = min(max(x, 0.0), nx - 1.0)
    y = min(max(y, 0.0), ny - 1.0)
    z = min(max(z, 0.0), nz - 1.0)
    fx = x - i
    fy = y - j
    fz = z - k
    return lerp3(c000, c001, c010, c011, c100, c101, c110, c111, fx, fy, fz)


def ray_exact(data, lut, lin_a, lin_b, lin_lo, nx, ny, nz, M, occ, ox, oy, oz, dx, dy, dz, tlen):
    """Exact integral of the SPEC 5 field (trilinear inside, nearest-voxel shell, 0 outside).

    Between consecutive crossings of integer index planes the (clamped) trilinear field is a
    polynomial of degree <= 3 in t, so Simpson's rule on each such segment is exact. The value at
    a segment's end is shared with the next segment (the field is continuous inside the box).
    Empty blocks (projector.occupancy_grid) are jumped over exactly like in ray_trilinear.
    """
    t0, t1, px, py, pz, qx, qy, qz = ray_box(M, nx, ny, nz, ox, oy, oz, dx, dy, dz, 0.0, tlen)
    if t1 <= t0:
        return 0.0
    ony = (ny + BLOCK - 1) // BLOCK
    onz = (nz + BLOCK - 1) // BLOCK
    si = ny * nz
    sj = nz
    acc = 0.0
    t = t0
    have_f0 = False
    f0 = 0.0
    tx, bx, sx = first_break(px + t0 * qx, qx, nx)
    ty, by, sy = first_break(py + t0 * qy, qy, ny)
    tz, bz, sz = first_break(pz + t0 * qz, qz, nz)
    tx += t0
    ty += t0
    tz += t0
    while t < t1:
        tn = min(tx, min(ty, tz))
        if tn >= t1:
            tn = t1
        else:
            # advance the plane(s) reached; planes beyond [0, n - 1] end that axis's breaks
            if tn == tx:
                bx += sx
                tx = 1e300 if (bx < 0.0 or bx > nx - 1.0) else (bx - px) / qx
            if tn == ty:
                by += sy
                ty = 1e300 if (by < 0.0 or by > ny - 1.0) else (by - py) / qy
            if tn == tz:
                bz += sz
                tz = 1e300 if (bz < 0.0 or bz > nz - 1.0) else (bz - pz) / qz
            if tn <= t:
                continue
        tm = 0.5 * (t + tn)
        xm = min(max(px + tm * qx, 0.0), nx - 1.0)
        ym = min(max(py + tm * qy, 0.0), ny - 1.0)
        zm = min(max(pz + tm * qz, 0.0), nz - 1.0)
        i = int(xm)
        j = int(ym)
        k = int(zm)
        bi = i // BLOCK
        bj = j // BLOCK
        bk = k // BLOCK
        if occ[(bi * ony + bj) * onz + bk] == 0:
            xi = px + tm * qx
            yi = py + tm * qy
            zi = pz + tm * qz
            if xi >= 0.0 and yi >= 0.0 and zi >= 0.0 and xi <= nx - 1.0 and yi <= ny - 1.0 and zi <= nz - 1.0:
                te = block_exit(px, py, pz, qx, qy, qz, bi, bj, bk, BLOCK)
                if te > tn:
                    tn = min(te, t1)
                    tx, bx, sx = first_break(px + tn * qx, qx, nx)
                    ty, by, sy = first_break(py + tn * qy, qy, ny)
                    tz, bz, sz = first_break(pz + tn * qz, qz, nz)
                    tx += tn
                    ty += tn
                    tz += tn
                t = tn
                f0 = 0.0
                have_f0 = True
                continue
        di = si if i < nx - 1 else 0
        dj = sj if j < ny - 1 else 0
        dk = 1 if k < nz - 1 else 0
        b = i * si + j * sj + k
        c000 = finish(raw_val(data[b], lut, lin_a, lin_lo), lin_a, lin_b)
        c001 = finish(raw_val(data[b + dk], lut, lin_a, lin_lo), lin_a, lin_b)
        c010 = finish(raw_val(data[b + dj], lut, lin_a, lin_lo), lin_a, lin_b)
        c011 = finish(raw_val(data[b + dj + dk], lut, lin_a, lin_lo), lin_a, lin_b)
        c100 = finish(raw_val(data[b + di], lut, lin_a, lin_lo), lin_a, lin_b)
        c101 = finish(raw_val(data[b + di + dk], lut, lin_a, lin_lo), lin_a, lin_b)
        c110 = finish(raw_val(data[b + di + dj], lut, lin_a, lin_lo), lin_a, lin_b)
        c111 = finish(raw_val(data[b + di + dj + dk], lut, lin_a, lin_lo), lin_a, lin_b)
        if not have_f0:
            f0 = corner_eval(c000, c001, c010, c011, c100, c101, c110, c111, i, j, k, nx, ny, nz,
                             px + t * qx, py + t * qy, pz + t * qz)
        fm = corner_eval(c000, c001, c010, c011, c100, c101, c110, c111, i, j, k, nx, ny, nz,
                         xm, ym, zm)
        f1 = corner_eval(c000, c001, c010, c011, c100, c101, c110, c111, i, j, k, nx, ny, nz,
                         px + tn * qx, py + tn * qy, pz + tn * qz)
        acc += (tn - t) * (f0 + 4.0 * fm + f1)
        f0 = f1
        have_f0 = True
        t = tn
    return acc / 6.0


def siddon_axis(p, q, n, t):
    """Voxel index at arc length t (just after it) along one axis, the t of its next cell face,
    the index step and the t between faces."""
    i = int(math.floor(p + t * q + 0.5))
    i = min(max(i, 0), n - 1)
    if q > 0.0:
        return i, (i + 0.5 - p) / q, 1, 1.0 / q
    if q < 0.0:
        return i, (i - 0.5 - p) / q, -1, -1.0 / q
    return i, 1e300, 0, 0.0


def ray_siddon(data, lut, lin_a, lin_b, lin_lo, nx, ny, nz, M, occ, ox, oy, oz, dx, dy, dz, tlen):
    """Exact integral of the nearest-voxel (piecewise constant) mu field along one ray.

    Voxels of empty BLOCK^3 blocks (projector.occupancy_grid: no voxel with mu > 0) are jumped
    over to the block's far face, where the traversal restarts.
    """
    t0, t1, px, py, pz, qx, qy, qz = ray_box(M, nx, ny, nz, ox, oy, oz, dx, dy, dz, 0.0, tlen)
    if t1 <= t0:
        return 0.0
    tm = t0 + 1e-9 * (t1 - t0)
    i, tx, si, ddx = siddon_axis(px, qx, nx, tm)
    j, ty, sj, ddy = siddon_axis(py, qy, ny, tm)
    k, tz, sk, ddz = siddon_axis(pz, qz, nz, tm)
    ony = (ny + BLOCK - 1) // BLOCK
    onz = (nz + BLOCK - 1) // BLOCK
    acc = 0.0
    t = t0
    snz = nz
    sny = ny * nz
    last = -1
    going = t < t1
    while going:  # one exit, no break/continue (see ray_trilinear)
        bi = i // BLOCK
        bj = j // BLOCK
        bk = k // BLOCK
        bid = (bi * ony + bj) * onz + bk
        skipped = False
        if bid != last:
            last = bid
            if occ[bid] == 0:
                # shift by half a voxel: cell faces i + 0.5 become the block grid's integer planes
                te = block_exit(px + 0.5, py + 0.5, pz + 0.5, qx, qy, qz, bi, bj, bk, BLOCK)
                if te >= t1:
                    going = False
                    skipped = True
                elif te > t:
                    t = te
                    tm = t + 1e-9 * (t1 - t0)
                    i, tx, si, ddx = siddon_axis(px, qx, nx, tm)
                    j, ty, sj, ddy = siddon_axis(py, qy, ny, tm)
                    k, tz, sk, ddz = siddon_axis(pz, qz, nz, tm)
                    skipped = True
        if not skipped:
            tn = min(tx, min(ty, tz))
            if tn > t1:
                tn = t1
            acc += (tn - t) * finish(raw_val(data[i * sny + j * snz + k], lut, lin_a, lin_lo), lin_a, lin_b)
            t = tn
            if tn == tx:
                i += si
                tx += ddx
                going = 0 <= i < nx
            elif tn == ty:
                j += sj
                ty += ddy
                going = 0 <= j < ny
            else:
                k += sk
                tz += ddz
                going = 0 <= k < nz
        going = going and t < t1
    return acc


def claims(mask, off, nx, ny, nz, x, y, z):
    """The composition rule's test for one placed volume (SPEC 5 scenes): the continuous index
    (x, y, z) lies in its cell box [-0.5, n - 0.5] and the nearest voxel is in its ``mask``. The
    first volume (in priority order) that claims a point gives its value; otherwise the warped
    base does. Used by ``ray_scene``, ``compose_subs`` and ``core.twin.articulated.sample_scene``."""
    if x < -0.5 or x > nx - 0.5 or y < -0.5 or y > ny - 0.5 or z < -0.5 or z > nz - 0.5:
        return False
    ri = min(max(int(math.floor(x + 0.5)), 0), nx - 1)
    rj = min(max(int(math.floor(y + 0.5)), 0), ny - 1)
    rk = min(max(int(math.floor(z + 0.5)), 0), nz - 1)
    return mask[off + (ri * ny + rj) * nz + rk] != 0


def warp_point(disp, W, wn, x, y, z):
    """Posed world point -> rest world point through the inverse-warp grid (0 outside the grid)."""
    gx, gy, gz = to_index(W, x, y, z)
    nx = wn[0]
    ny = wn[1]
    nz = wn[2]
    if gx < -0.5 or gy < -0.5 or gz < -0.5 or gx > nx - 0.5 or gy > ny - 0.5 or gz > nz - 0.5:
        return x, y, z
    gx = min(max(gx, 0.0), nx - 1.0)
    gy = min(max(gy, 0.0), ny - 1.0)
    gz = min(max(gz, 0.0), nz - 1.0)
    i = min(int(gx), nx - 1)
    j = min(int(gy), ny - 1)
    k = min(int(gz), nz - 1)
    fx = gx - i
    fy = gy - j
    fz = gz - k
    i1 = min(i + 1, nx - 1)
    j1 = min(j + 1, ny - 1)
    k1 = min(k + 1, nz - 1)
    ox = x
    oy = y
    oz = z
    for a in range(3):
        val = lerp3(disp[i, j, k, a], disp[i, j, k1, a], disp[i, j1, k, a], disp[i, j1, k1, a],
                    disp[i1, j, k, a], disp[i1, j, k1, a], disp[i1, j1, k, a], disp[i1, j1, k1, a], fx, fy, fz)
        if a == 0:
            ox += val
        elif a == 1:
            oy += val
        else:
            oz += val
    return ox, oy, oz


def ray_scene(bdata, blut, blin_a, blin_b, blin_lo, bshape, BM, use_warp, disp, WM, wn, sdata, smask, slut, slin_a, slin_b, slin_lo,
              sparams, nsub, cidx, ct0, ct1, ox, oy, oz, dx, dy, dz, tlen, step):
    """Posed scene: base volume (optionally inverse-warped) + rigid sub-volumes with masks.

    At a sample inside the mask of a sub-volume (nearest voxel flag), the first such sub-volume's
    trilinear mu counts and the base does not. ``sparams[s]`` = (offset, nx, ny, nz, M[12]).
    ``cidx``/``ct0``/``ct1`` are per-ray scratch arrays of length MAX_CAND.
    """
    bnx = bshape[0]
    bny = bshape[1]
    bnz = bshape[2]
    t0, t1, px, py, pz, qx, qy, qz = ray_box(BM, bnx, bny, bnz, ox, oy, oz, dx, dy, dz, 0.0, tlen)
    if use_warp:
        w0, w1, px, py, pz, qx, qy, qz = ray_box(WM, wn[0], wn[1], wn[2], ox, oy, oz, dx, dy, dz,
                                                 0.0, tlen)
        if w1 > w0:
            if t1 > t0:
                t0 = min(t0, w0)
                t1 = max(t1, w1)
            else:
                t0 = w0
                t1 = w1
    ncand = 0
    for s in range(nsub):
        a0, a1, px, py, pz, qx, qy, qz = ray_box(sparams[s, 4:16], int(sparams[s, 1]),
                                                 int(sparams[s, 2]), int(sparams[s, 3]),
                                                 ox, oy, oz, dx, dy, dz, 0.0, tlen)
        if a1 > a0 and ncand < cidx.shape[0]:
            cidx[ncand] = s
            ct0[ncand] = a0
            ct1[ncand] = a1
            ncand += 1
            if t1 > t0:
                t0 = min(t0, a0)
                t1 = max(t1, a1)
            else:
                t0 = a0
                t1 = a1
    if t1 <= t0:
        return 0.0
    nsteps = int(math.ceil((t1 - t0) / step))
    if nsteps < 1:
        nsteps = 1
    h = (t1 - t0) / nsteps
    acc = 0.0
    for m in range(nsteps):
        t = t0 + (m + 0.5) * h
        x = ox + t * dx
        y = oy + t * dy
        z = oz + t * dz
        claimed = False
        for c in range(ncand):
            if t >= ct0[c] and t <= ct1[c]:
                s = cidx[c]
                snx = int(sparams[s, 1])
                sny = int(sparams[s, 2])
                snz = int(sparams[s, 3])
                ix, iy, iz = to_index(sparams[s, 4:16], x, y, z)
                off = int(sparams[s, 0])
                if claims(smask, off, snx, sny, snz, ix, iy, iz):
                    acc += trilinear(sdata, slut, slin_a, slin_b, slin_lo, off, snx, sny, snz, ix, iy, iz)
                    claimed = True
                    break
        if not claimed:
            wx = x
            wy = y
            wz = z
            if use_warp:
                wx, wy, wz = warp_point(disp, WM, wn, x, y, z)
                if wx != wx or wy != wy or wz != wz:  # a NaN node: posed air
                    continue
            bx, by, bz = to_index(BM, wx, wy, wz)
            if (bx >= -0.5 and by >= -0.5 and bz >= -0.5 and bx <= bnx - 0.5 and by <= bny - 0.5
                    and bz <= bnz - 0.5):
                acc += trilinear(bdata, blut, blin_a, blin_b, blin_lo, 0, bnx, bny, bnz, bx, by, bz)
    return acc * h


def ray_method(method, data, lut, lin_a, lin_b, lin_lo, nx, ny, nz, M, occ, ox, oy, oz, dx, dy, dz, tlen,
               step):
    """One ray's line integral by the method code (0 trilinear, 1 siddon, 2 exact; projector.METHODS)."""
    if method == 1:
        return ray_siddon(data, lut, lin_a, lin_b, lin_lo, nx, ny, nz, M, occ, ox, oy, oz, dx, dy, dz, tlen)
    if method == 2:
        return ray_exact(data, lut, lin_a, lin_b, lin_lo, nx, ny, nz, M, occ, ox, oy, oz, dx, dy, dz, tlen)
    return ray_trilinear(data, lut, lin_a, lin_b, lin_lo, nx, ny, nz, M, occ, ox, oy, oz, dx, dy, dz, tlen, step)


_PER_RAY = ("pixel_ray", "to_index", "slab", "ray_box", "raw_val", "finish", "lerp3", "trilinear", "trilinear_ijk",
            "block_exit", "first_break", "corner_eval", "ray_exact", "ray_trilinear",
            "siddon_axis", "ray_siddon", "ray_method", "claims", "warp_point", "ray_scene")


# ----------------------------------------------------------------------------------------------
# drivers
# ----------------------------------------------------------------------------------------------
def cpu_static(out, geo, data, lut, lin_a, lin_b, lin_lo, nx, ny, nz, M, occ, step, method):
    H = out.shape[0]
    W = out.shape[1]
    for p in prange(H * W):  # noqa: F821 (prange is injected by _build)
        r = p // W
        c = p - r * W
        ox, oy, oz, dx, dy, dz, tlen = pixel_ray(geo, r, c)
        out[r, c] = ray_method(method, data, lut, lin_a, lin_b, lin_lo, nx, ny, nz, M, occ, ox, oy, oz,
                               dx, dy, dz, tlen, step)


def samples_step(M, nx, ny, nz, ox, oy, oz, dx, dy, dz, tlen, nsamp, step):
    """The step with which ``ray_trilinear`` takes exactly ``nsamp`` samples over the part of the ray
    inside the volume's cell box (nsamp > 0; nanodrr's "samples per ray"), else ``step``.

    ray_trilinear takes ceil((t1 - t0) / step) samples; (t1 - t0) / (nsamp - 0.5) puts that ratio
    half a sample below nsamp, so rounding cannot add or drop a sample."""
    if nsamp <= 0:
        return step
    t0, t1, px, py, pz, qx, qy, qz = ray_box(M, nx, ny, nz, ox, oy, oz, dx, dy, dz, 0.0, tlen)
    if t1 <= t0:
        return step
    return (t1 - t0) / (nsamp - 0.5)


def cpu_batch(out, geos, data, lut, lin_a, lin_b, lin_lo, nx, ny, nz, Ms, occ, steps, nsamp, method):
    """Item v of the batch: geometry geos[v], the volume placed by Ms[v] (world -> index, 12), step
    steps[v] or ``nsamp`` samples per ray (trilinear; nsamp = 0: by step)."""
    B = out.shape[0]
    H = out.shape[1]
    W = out.shape[2]
    for p in prange(B * H * W):  # noqa: F821
        v = p // (H * W)
        q = p - v * H * W
        r = q // W
        c = q - r * W
        ox, oy, oz, dx, dy, dz, tlen = pixel_ray(geos[v], r, c)
        st = samples_step(Ms[v], nx, ny, nz, ox, oy, oz, dx, dy, dz, tlen, nsamp, steps[v])
        out[v, r, c] = ray_method(method, data, lut, lin_a, lin_b, lin_lo, nx, ny, nz, Ms[v], occ, ox, oy, oz,
                                  dx, dy, dz, tlen, st)


def cuda_batch(out, geos, data, lut, lin_a, lin_b, lin_lo, nx, ny, nz, Ms, occ, steps, nsamp, method):
    p = cuda.grid(1)  # noqa: F821
    B = out.shape[0]
    H = out.shape[1]
    W = out.shape[2]
    if p < B * H * W:
        v = p // (H * W)
        q = p - v * H * W
        r = q // W
        c = q - r * W
        ox, oy, oz, dx, dy, dz, tlen = pixel_ray(geos[v], r, c)
        st = samples_step(Ms[v], nx, ny, nz, ox, oy, oz, dx, dy, dz, tlen, nsamp, steps[v])
        out[v, r, c] = ray_method(method, data, lut, lin_a, lin_b, lin_lo, nx, ny, nz, Ms[v], occ, ox, oy, oz,
                                  dx, dy, dz, tlen, st)


_PER_RAY = _PER_RAY + ("samples_step",)


def cpu_scene(out, geo, bdata, blut, blin_a, blin_b, blin_lo, bshape, BM, use_warp, disp, WM, wn, sdata,
              smask, slut, slin_a, slin_b, slin_lo, sparams, nsub, step):
    H = out.shape[0]
    W = out.shape[1]
    for p in prange(H * W):  # noqa: F821
        cidx = np.empty(MAX_CAND, np.int32)
        ct0 = np.empty(MAX_CAND, np.float64)
        ct1 = np.empty(MAX_CAND, np.float64)
        r = p // W
        c = p - r * W
        ox, oy, oz, dx, dy, dz, tlen = pixel_ray(geo, r, c)
        out[r, c] = ray_scene(bdata, blut, blin_a, blin_b, blin_lo, bshape, BM, use_warp, disp, WM, wn, sdata,
                              smask, slut, slin_a, slin_b, slin_lo, sparams, nsub, cidx, ct0, ct1, ox, oy, oz,
                              dx, dy, dz, tlen, step)


def cuda_static(out, geo, data, lut, lin_a, lin_b, lin_lo, nx, ny, nz, M, occ, step, method):
    p = cuda.grid(1)  # noqa: F821 (cuda is injected by _build)
    H = out.shape[0]
    W = out.shape[1]
    if p < H * W:
        r = p // W
        c = p - r * W
        ox, oy, oz, dx, dy, dz, tlen = pixel_ray(geo, r, c)
        out[r, c] = ray_method(method, data, lut, lin_a, lin_b, lin_lo, nx, ny, nz, M, occ, ox, oy, oz,
                               dx, dy, dz, tlen, step)


def cuda_scene(out, geo, bdata, blut, blin_a, blin_b, blin_lo, bshape, BM, use_warp, disp, WM, wn, sdata,
               smask, slut, slin_a, slin_b, slin_lo, sparams, nsub, step):
    p = cuda.grid(1)  # noqa: F821
    H = out.shape[0]
    W = out.shape[1]
    if p < H * W:
        cidx = cuda.local.array(MAX_CAND, numba.int32)  # noqa: F821
        ct0 = cuda.local.array(MAX_CAND, numba.float64)  # noqa: F821
        ct1 = cuda.local.array(MAX_CAND, numba.float64)  # noqa: F821
        r = p // W
        c = p - r * W
        ox, oy, oz, dx, dy, dz, tlen = pixel_ray(geo, r, c)
        out[r, c] = ray_scene(bdata, blut, blin_a, blin_b, blin_lo, bshape, BM, use_warp, disp, WM, wn, sdata,
                              smask, slut, slin_a, slin_b, slin_lo, sparams, nsub, cidx, ct0, ct1, ox, oy, oz,
                              dx, dy, dz, tlen, step)


def compile_shared(namespace: dict, names, decorate, extra: dict) -> dict:
    """A fresh copy of ``namespace`` (a module's globals, plus ``extra``) in which the functions
    ``names`` are compiled with ``decorate`` and call each other compiled: one Python source for the
    CPU (``numba.njit``) and for CUDA (``cuda.jit(device=True)``)."""
    ns = dict(namespace)
    ns.update(extra)
    for name in names:
        f = namespace[name]
        ns[name] = decorate(types.FunctionType(f.__code__, ns, name, f.__defaults__))
    return ns


def _build(decorate, extra: dict) -> dict:
    """Compile the per-ray functions with ``decorate`` into a fresh namespace and return it."""
    return compile_shared(globals(), _PER_RAY, decorate, extra)


_CPU = None
_CUDA = None


def cpu_kernels() -> dict:
    """{'static': ..., 'scene': ...} numba-parallel CPU drivers (compiled lazily, cached on disk)."""
    global _CPU
    if _CPU is None:
        import numba

        # lerp3 and claims are inlined in numba's IR: left to LLVM, the calls stayed in
        # corner_eval's sample loop (measured 28-34 % slower trilinear and exact DRRs of the 3 mm
        # phantom at 256^2, loaded 2-core machine)
        ns = _build(lambda f: numba.njit(f, cache=True, fastmath=True,
                                         inline="always" if f.__name__ in ("lerp3", "claims") else "never"),
                    {"prange": numba.prange, "numba": numba})
        out = {}
        for name in ("cpu_static", "cpu_scene", "cpu_batch"):
            f = globals()[name]
            fn = types.FunctionType(f.__code__, ns, name)
            out[name[4:]] = numba.njit(fn, parallel=True, cache=True, fastmath=True)
        _CPU = out
    return _CPU


def cuda_kernels() -> dict:
    """{'static': ..., 'scene': ...} CUDA kernels (one thread per pixel)."""
    global _CUDA
    if _CUDA is None:
        import numba
        from numba import cuda

        ns = _build(lambda f: cuda.jit(device=True)(f), {"cuda": cuda, "numba": numba})
        out = {}
        for name in ("cuda_static", "cuda_scene", "cuda_batch"):
            f = globals()[name]
            out[name[5:]] = cuda.jit(types.FunctionType(f.__code__, ns, name))
        _CUDA = out
    return _CUDA


# ----------------------------------------------------------------------------------------------
# scene composition (CPU): a posed scene written onto one grid, then rendered by the static kernels
# ----------------------------------------------------------------------------------------------
# The output grid is the base volume's lattice, extended by whole BLOCKs: output voxel o is base
# voxel o - shift. Values are HU (int16); interpolation clamps HU at ``lo`` (-1000: mu = 0) first,
# like the kernels' linear mode, so a composed voxel holds the HU whose mu is the interpolated mu.
# Every voxel written with HU > lo marks its empty-space blocks (the projector.occupancy_grid
# rule: blocks i // BLOCK and (i - 1) // BLOCK per axis) in ``occ``, which starts as the base's
# grid: a superset of the exact grid, which keeps the base's blocks where content moved away.
# ``refine_occ`` then clears the marked blocks whose voxels are all air (each read up to its first
# row holding a non-air voxel), which leaves the exact grid of the composed voxels.


# The composition kernels are plain module-level functions (no closures), compiled lazily by
# _compose_build() over a namespace dict in which their callees are globals, like _build() does
# for the ray kernels: numba's on-disk cache key of a closure hashes its pickled cells (other
# dispatchers), which differ in every process, so closures would be recompiled in every process.
# Measured, test_articulated.py -k test_posed_knee_renders_bones_rigid in a second process (loaded
# 2-core machine): 28.3 s as closures (recompiled every time), 1.0 s as module functions (all loaded).


def _hu_at(data, off, nx, ny, nz, x, y, z, lo):
    """Trilinear HU (corners clamped at ``lo``) at continuous index (x, y, z) inside the cell box."""
    x = min(max(x, 0.0), nx - 1.0)
    y = min(max(y, 0.0), ny - 1.0)
    z = min(max(z, 0.0), nz - 1.0)
    return _hu_at_ijk(data, off, nx, ny, nz, x, y, z, int(x), int(y), int(z), lo)


def _hu_at_ijk(data, off, nx, ny, nz, x, y, z, i, j, k, lo):
    """``_hu_at`` at a point already clamped to [0, n - 1] on each axis, with i, j, k = int(x, y, z)
    (the same arithmetic, without clamping again)."""
    fx = x - i
    fy = y - j
    fz = z - k
    si = ny * nz
    di = si if i < nx - 1 else 0
    dj = nz if j < ny - 1 else 0
    dk = 1 if k < nz - 1 else 0
    b = off + i * si + j * nz + k
    c000 = max(float(data[b]), lo)
    c001 = max(float(data[b + dk]), lo)
    c010 = max(float(data[b + dj]), lo)
    c011 = max(float(data[b + dj + dk]), lo)
    c100 = max(float(data[b + di]), lo)
    c101 = max(float(data[b + di + dk]), lo)
    c110 = max(float(data[b + di + dj]), lo)
    c111 = max(float(data[b + di + dj + dk]), lo)
    return lerp3(c000, c001, c010, c011, c100, c101, c110, c111, fx, fy, fz)


def _to_i16(v):
    r = math.floor(v + 0.5)
    if r > 32767.0:
        r = 32767.0
    if r < -32768.0:
        r = -32768.0
    return np.int16(r)


def _mark(occ, i, j, k):
    bi = i // BLOCK
    bj = j // BLOCK
    bk = k // BLOCK
    bi2 = (i - 1) // BLOCK if i > 0 else bi
    bj2 = (j - 1) // BLOCK if j > 0 else bj
    bk2 = (k - 1) // BLOCK if k > 0 else bk
    occ[bi, bj, bk] = 1
    occ[bi, bj, bk2] = 1
    occ[bi, bj2, bk] = 1
    occ[bi, bj2, bk2] = 1
    occ[bi2, bj, bk] = 1
    occ[bi2, bj, bk2] = 1
    occ[bi2, bj2, bk] = 1
    occ[bi2, bj2, bk2] = 1


def _mark_new(occ, i, j, k, last):
    """``_mark(occ, i, j, k)`` unless ``last`` (what this returned for an earlier voxel of row (i, j);
    -1: none) shows that the same blocks are set already; returns the key of the blocks that voxel k
    marks on its row (k // BLOCK, and (k - 1) // BLOCK when that differs)."""
    key = (k // BLOCK) * 2 + (1 if (k % BLOCK == 0 and k > 0) else 0)
    if key != last:
        _mark(occ, i, j, k)
    return key


def _any_occ(cum, b0, b1, c0, c1, d0, d1):
    """Any occupied block in the inclusive block box (``cum``: 3-D prefix sums, padded by 1)."""
    n0 = cum.shape[0] - 2
    n1 = cum.shape[1] - 2
    n2 = cum.shape[2] - 2
    b0 = max(b0, 0)
    c0 = max(c0, 0)
    d0 = max(d0, 0)
    b1 = min(b1, n0)
    c1 = min(c1, n1)
    d1 = min(d1, n2)
    if b1 < b0 or c1 < c0 or d1 < d0:
        return False
    b1 += 1
    c1 += 1
    d1 += 1
    v = (cum[b1, c1, d1] - cum[b0, c1, d1] - cum[b1, c0, d1] - cum[b1, c1, d0]
         + cum[b0, c0, d1] + cum[b0, c1, d0] + cum[b1, c0, d0] - cum[b0, c0, d0])
    return v > 0


def warp_cell(out, occ, on, shift, base, bn, focc, fcum, G, Ginv, wn, disp, B, lo, dirty, diag, d, ca, cb, cc):
    """One warp cell (ca, cb, cc) of ``compose_warp`` (see there); ``diag``: ``G`` is a positive
    diagonal scaling (``warp_diag``); ``d`` (8, 3) float64 scratch."""
    n1 = on[1]
    n2 = on[2]
    nb0 = bn[0]
    nb1 = bn[1]
    nb2 = bn[2]
    air = False
    dlo0 = 1e30
    dlo1 = 1e30
    dlo2 = 1e30
    dhi0 = -1e30
    dhi1 = -1e30
    dhi2 = -1e30
    for q in range(8):
        a_ = ca + ((q >> 2) & 1)
        b_ = cb + ((q >> 1) & 1)
        c_ = cc + (q & 1)
        x = disp[a_, b_, c_, 0]
        y = disp[a_, b_, c_, 1]
        z = disp[a_, b_, c_, 2]
        if x != x or y != y or z != z:
            air = True
            x = 0.0
            y = 0.0
            z = 0.0
        d0 = B[0, 0] * x + B[0, 1] * y + B[0, 2] * z
        d1 = B[1, 0] * x + B[1, 1] * y + B[1, 2] * z
        d2 = B[2, 0] * x + B[2, 1] * y + B[2, 2] * z
        d[q, 0] = d0
        d[q, 1] = d1
        d[q, 2] = d2
        dlo0 = min(dlo0, d0)
        dhi0 = max(dhi0, d0)
        dlo1 = min(dlo1, d1)
        dhi1 = max(dhi1, d1)
        dlo2 = min(dlo2, d2)
        dhi2 = max(dhi2, d2)
    # the voxel box of the cell (corners expanded by half a node at the grid's faces)
    glo0 = ca - (0.5 if ca == 0 else 0.0)
    glo1 = cb - (0.5 if cb == 0 else 0.0)
    glo2 = cc - (0.5 if cc == 0 else 0.0)
    ghi0 = ca + 1.0 + (0.5 if ca == wn[0] - 2 else 0.0)
    ghi1 = cb + 1.0 + (0.5 if cb == wn[1] - 2 else 0.0)
    ghi2 = cc + 1.0 + (0.5 if cc == wn[2] - 2 else 0.0)
    blo0 = 1e30
    blo1 = 1e30
    blo2 = 1e30
    bhi0 = -1e30
    bhi1 = -1e30
    bhi2 = -1e30
    for q in range(8):
        g0 = ghi0 if (q & 4) else glo0
        g1 = ghi1 if (q & 2) else glo1
        g2 = ghi2 if (q & 1) else glo2
        x = Ginv[0, 0] * g0 + Ginv[0, 1] * g1 + Ginv[0, 2] * g2 + Ginv[0, 3]
        y = Ginv[1, 0] * g0 + Ginv[1, 1] * g1 + Ginv[1, 2] * g2 + Ginv[1, 3]
        z = Ginv[2, 0] * g0 + Ginv[2, 1] * g1 + Ginv[2, 2] * g2 + Ginv[2, 3]
        blo0 = min(blo0, x)
        blo1 = min(blo1, y)
        blo2 = min(blo2, z)
        bhi0 = max(bhi0, x)
        bhi1 = max(bhi1, y)
        bhi2 = max(bhi2, z)
    i0 = max(int(math.ceil(blo0 - 1e-9)) + shift[0], 0)
    i1 = min(int(math.floor(bhi0 + 1e-9)) + shift[0], on[0] - 1)
    j0 = max(int(math.ceil(blo1 - 1e-9)) + shift[1], 0)
    j1 = min(int(math.floor(bhi1 + 1e-9)) + shift[1], n1 - 1)
    k0 = max(int(math.ceil(blo2 - 1e-9)) + shift[2], 0)
    k1 = min(int(math.floor(bhi2 + 1e-9)) + shift[2], n2 - 1)
    if not air:  # the rest-space box of the cell: any tissue there?
        air = not _any_occ(fcum, int(math.floor((blo0 + dlo0 - 1.0) / FINE)),
                           int(math.floor((bhi0 + dhi0 + 1.0) / FINE)),
                           int(math.floor((blo1 + dlo1 - 1.0) / FINE)),
                           int(math.floor((bhi1 + dhi1 + 1.0) / FINE)),
                           int(math.floor((blo2 + dlo2 - 1.0) / FINE)),
                           int(math.floor((bhi2 + dhi2 + 1.0) / FINE)))
    if air and not _any_occ(fcum, int(math.floor((blo0 - 1.0) / FINE)),
                            int(math.floor((bhi0 + 1.0) / FINE)),
                            int(math.floor((blo1 - 1.0) / FINE)),
                            int(math.floor((bhi1 + 1.0) / FINE)),
                            int(math.floor((blo2 - 1.0) / FINE)),
                            int(math.floor((bhi2 + 1.0) / FINE))):
        return  # air over air: nothing to change
    if i1 >= i0 and j1 >= j0 and k1 >= k0:
        for a_ in range(i0 // BLOCK, i1 // BLOCK + 1):
            for b_ in range(j0 // BLOCK, j1 // BLOCK + 1):
                for c_ in range(k0 // BLOCK, k1 // BLOCK + 1):
                    dirty[a_, b_, c_] = 1
    if diag:
        # G is a positive diagonal scaling: g0 depends on i only, g1 on j, g2 on k; the displacement
        # is bilinear per (i, j) and linear along k. g2 grows with k, so the voxels of a row that
        # belong to this cell are one run [ka, kb] (found once per cell, by the per-voxel test)
        ka = k1 + 1
        kb = k0 - 1
        for k in range(k0, k1 + 1):
            g2 = G[2, 2] * float(k - shift[2]) + G[2, 3]
            if g2 >= -0.5 and g2 <= wn[2] - 0.5:
                g2 = min(max(g2, 0.0), wn[2] - 1.0)
                if min(int(g2), wn[2] - 2) == cc:
                    ka = min(ka, k)
                    kb = max(kb, k)
        for i in range(i0, i1 + 1):
            bx = float(i - shift[0])
            g0 = G[0, 0] * bx + G[0, 3]
            if g0 < -0.5 or g0 > wn[0] - 0.5:
                continue
            g0 = min(max(g0, 0.0), wn[0] - 1.0)
            if min(int(g0), wn[0] - 2) != ca:
                continue
            fx = g0 - ca
            for j in range(j0, j1 + 1):
                by = float(j - shift[1])
                g1 = G[1, 1] * by + G[1, 3]
                if g1 < -0.5 or g1 > wn[1] - 0.5:
                    continue
                g1 = min(max(g1, 0.0), wn[1] - 1.0)
                if min(int(g1), wn[1] - 2) != cb:
                    continue
                row = (i * n1 + j) * n2
                if air:
                    for k in range(ka, kb + 1):
                        out[row + k] = np.int16(lo)
                    continue
                fy = g1 - cb
                w00 = (1.0 - fx) * (1.0 - fy)
                w01 = (1.0 - fx) * fy
                w10 = fx * (1.0 - fy)
                w11 = fx * fy
                l0 = w00 * d[0, 0] + w01 * d[2, 0] + w10 * d[4, 0] + w11 * d[6, 0]
                l1 = w00 * d[0, 1] + w01 * d[2, 1] + w10 * d[4, 1] + w11 * d[6, 1]
                l2 = w00 * d[0, 2] + w01 * d[2, 2] + w10 * d[4, 2] + w11 * d[6, 2]
                h0 = w00 * d[1, 0] + w01 * d[3, 0] + w10 * d[5, 0] + w11 * d[7, 0]
                h1 = w00 * d[1, 1] + w01 * d[3, 1] + w10 * d[5, 1] + w11 * d[7, 1]
                h2 = w00 * d[1, 2] + w01 * d[3, 2] + w10 * d[5, 2] + w11 * d[7, 2]
                e0 = h0 - l0
                e1 = h1 - l1
                e2 = h2 - l2
                mk = -1  # the row's last marked blocks (_mark_new)
                for k in range(ka, kb + 1):
                    o = row + k
                    bz = float(k - shift[2])
                    g2 = min(max(G[2, 2] * bz + G[2, 3], 0.0), wn[2] - 1.0)
                    fz = g2 - cc
                    px = bx + l0 + e0 * fz
                    py = by + l1 + e1 * fz
                    pz = bz + l2 + e2 * fz
                    if (px < -0.5 or py < -0.5 or pz < -0.5 or px > nb0 - 0.5
                            or py > nb1 - 0.5 or pz > nb2 - 0.5):
                        out[o] = np.int16(lo)
                        continue
                    # the rest point's fine block: all samples there are air
                    cx = min(max(px, 0.0), nb0 - 1.0)
                    cy = min(max(py, 0.0), nb1 - 1.0)
                    cz = min(max(pz, 0.0), nb2 - 1.0)
                    ix = int(cx)
                    iy = int(cy)
                    iz = int(cz)
                    if focc[ix // FINE, iy // FINE, iz // FINE] == 0:
                        out[o] = np.int16(lo)
                        continue
                    v16 = _to_i16(_hu_at_ijk(base, 0, nb0, nb1, nb2, cx, cy, cz, ix, iy, iz, lo))
                    out[o] = v16
                    if v16 > lo:
                        mk = _mark_new(occ, i, j, k, mk)
        return
    for i in range(i0, i1 + 1):
        bx = float(i - shift[0])
        for j in range(j0, j1 + 1):
            by = float(j - shift[1])
            mk = -1
            for k in range(k0, k1 + 1):
                bz = float(k - shift[2])
                g0 = G[0, 0] * bx + G[0, 1] * by + G[0, 2] * bz + G[0, 3]
                g1 = G[1, 0] * bx + G[1, 1] * by + G[1, 2] * bz + G[1, 3]
                g2 = G[2, 0] * bx + G[2, 1] * by + G[2, 2] * bz + G[2, 3]
                if (g0 < -0.5 or g1 < -0.5 or g2 < -0.5 or g0 > wn[0] - 0.5
                        or g1 > wn[1] - 0.5 or g2 > wn[2] - 0.5):
                    continue
                g0 = min(max(g0, 0.0), wn[0] - 1.0)
                g1 = min(max(g1, 0.0), wn[1] - 1.0)
                g2 = min(max(g2, 0.0), wn[2] - 1.0)
                if (min(int(g0), wn[0] - 2) != ca or min(int(g1), wn[1] - 2) != cb
                        or min(int(g2), wn[2] - 2) != cc):
                    continue
                o = (i * n1 + j) * n2 + k
                if air:
                    out[o] = np.int16(lo)
                    continue
                fx = g0 - ca
                fy = g1 - cb
                fz = g2 - cc
                px = bx
                py = by
                pz = bz
                for q in range(8):
                    w = ((fx if (q & 4) else 1.0 - fx) * (fy if (q & 2) else 1.0 - fy)
                         * (fz if (q & 1) else 1.0 - fz))
                    px += w * d[q, 0]
                    py += w * d[q, 1]
                    pz += w * d[q, 2]
                if (px < -0.5 or py < -0.5 or pz < -0.5 or px > nb0 - 0.5
                        or py > nb1 - 0.5 or pz > nb2 - 0.5):
                    out[o] = np.int16(lo)
                else:
                    v16 = _to_i16(_hu_at(base, 0, nb0, nb1, nb2, px, py, pz, lo))
                    out[o] = v16
                    if v16 > lo:
                        mk = _mark_new(occ, i, j, k, mk)


def warp_diag(G):
    """Whether the base index -> warp index map ``G`` (3x4) is a positive diagonal scaling."""
    return (G[0, 1] == 0.0 and G[0, 2] == 0.0 and G[1, 0] == 0.0 and G[1, 2] == 0.0 and G[2, 0] == 0.0
            and G[2, 1] == 0.0 and G[0, 0] > 0.0 and G[1, 1] > 0.0 and G[2, 2] > 0.0)


def cell_moved(disp, ca, cb, cc):
    """Whether a node of warp cell (ca, cb, cc) has a non-zero (or NaN) displacement."""
    moved = False
    for q in range(8):
        a_ = ca + ((q >> 2) & 1)
        b_ = cb + ((q >> 1) & 1)
        c_ = cc + (q & 1)
        if disp[a_, b_, c_, 0] != 0.0 or disp[a_, b_, c_, 1] != 0.0 or disp[a_, b_, c_, 2] != 0.0:
            moved = True  # NaN != 0 too
    return moved


def compose_warp(out, occ, on, shift, base, bn, focc, fcum, G, Ginv, wn, disp, B, cells, lo, dirty):
    """Soft tissue pulled through the warp, in the listed warp cells only (elsewhere the
    displacement is 0 and the base value is already in place).

    ``G`` (3x4): base index -> warp index; ``Ginv`` its inverse; ``disp`` (a, b, c, 3) the
    displacement (mm) and ``B`` (3x3) mm -> base index; ``cells`` (m, 3): the active cells (a
    node moved). A cell with a NaN node is air. A voxel belongs to the cell of its clamped
    warp coordinate (each voxel to one cell); voxels outside the warp grid's cell box are not
    moved. ``focc``: the base's fine air grid (FINE^3 blocks: 0 where every trilinear sample
    whose floor index lies in the block is air), ``fcum`` its prefix sums. A cell whose
    rest-space box (its voxels plus the range of its nodes' displacements) holds no occupied
    fine block is air, and so is a voxel whose rest point lies in an empty fine block. An air
    cell over air base voxels is left as it is. ``dirty`` (the output's BLOCK^3 grid) gets a 1
    on every block that a cell may have written."""
    diag = warp_diag(G)
    m = cells.shape[0]
    nch = min(m, 1024)
    for ch in prange(nch):  # noqa: F821 (prange: a global of the build namespace)
        d = np.empty((8, 3))
        for c in range(ch * m // nch, (ch + 1) * m // nch):
            warp_cell(out, occ, on, shift, base, bn, focc, fcum, G, Ginv, wn, disp, B, lo, dirty, diag, d,
                      cells[c, 0], cells[c, 1], cells[c, 2])


def subs_part_row(out, occ, on, shift, sdata, smask, offs, sns, S, aligned, boxes, spans, soffs, lo, i, j, s):
    """Sub-volume s written on output row (i, j), inside its box (see ``compose_subs``)."""
    n1 = on[1]
    n2 = on[2]
    bx = float(i - shift[0])
    by = float(j - shift[1])
    orow = (i * n1 + j) * n2
    off = offs[s]
    s0 = sns[s, 0]
    s1 = sns[s, 1]
    s2 = sns[s, 2]
    if aligned[s, 3] != 0:
        a = i - shift[0] - aligned[s, 0]
        dk = shift[2] + aligned[s, 2]
        b = j - shift[1] - aligned[s, 1]
        srow = off + (a * s1 + b) * s2
        r = soffs[s] + a * s1 + b
        mk = -1
        for k in range(max(boxes[s, 4], spans[0, r] + dk), min(boxes[s, 5], spans[1, r] + dk) + 1):
            c = k - dk
            if smask[srow + c] != 0:
                v = sdata[srow + c]
                out[orow + k] = v
                if v > lo:
                    mk = _mark_new(occ, i, j, k, mk)
        return
    x0 = S[s, 0, 0] * bx + S[s, 0, 1] * by + S[s, 0, 3]
    y0 = S[s, 1, 0] * bx + S[s, 1, 1] * by + S[s, 1, 3]
    z0 = S[s, 2, 0] * bx + S[s, 2, 1] * by + S[s, 2, 3]
    # clip the row to the sub-volume's cell box (sub index linear in bz = k - shift)
    klo = float(boxes[s, 4])
    khi = float(boxes[s, 5])
    for ax in range(3):
        p0 = x0 if ax == 0 else (y0 if ax == 1 else z0)
        sl = S[s, ax, 2]
        nax = float(sns[s, ax])
        if abs(sl) < 1e-12:
            if p0 < -0.5 or p0 > nax - 0.5:
                khi = -1.0
                klo = 0.0
        else:
            ta = (-0.5 - p0) / sl + shift[2]
            tb = (nax - 0.5 - p0) / sl + shift[2]
            if ta > tb:
                tmp = ta
                ta = tb
                tb = tmp
            klo = max(klo, math.ceil(min(max(ta, klo - 1.0), khi + 1.0) - 1e-9))
            khi = min(khi, math.floor(min(max(tb, klo - 1.0), khi + 1.0) + 1e-9))
    mk = -1
    for k in range(int(klo), int(khi) + 1):
        bz = float(k - shift[2])
        x = x0 + S[s, 0, 2] * bz
        y = y0 + S[s, 1, 2] * bz
        z = z0 + S[s, 2, 2] * bz
        if claims(smask, off, s0, s1, s2, x, y, z):
            v16 = _to_i16(_hu_at(sdata, off, s0, s1, s2, x, y, z, lo))
            out[orow + k] = v16
            if v16 > lo:
                mk = _mark_new(occ, i, j, k, mk)


def subs_row(out, occ, on, shift, sdata, smask, offs, sns, S, aligned, boxes, order, spans, soffs, lo, i, j):
    """Output row (i, j): the sub-volumes whose boxes hold it, in ``order`` (see ``compose_subs``)."""
    for q in range(order.shape[0]):
        s = order[q]
        if i >= boxes[s, 0] and i <= boxes[s, 1] and j >= boxes[s, 2] and j <= boxes[s, 3]:
            subs_part_row(out, occ, on, shift, sdata, smask, offs, sns, S, aligned, boxes, spans, soffs, lo, i, j, s)


def subs_span(on, boxes, order):
    """(first i, last i, first j, last j) of the output rows that some sub-volume's box covers
    (first > last: none)."""
    i_lo = on[0]
    i_hi = -1
    j_lo = on[1]
    j_hi = -1
    for q in range(order.shape[0]):
        s = order[q]
        if boxes[s, 1] >= boxes[s, 0] and boxes[s, 3] >= boxes[s, 2]:
            i_lo = min(i_lo, boxes[s, 0])
            i_hi = max(i_hi, boxes[s, 1])
            j_lo = min(j_lo, boxes[s, 2])
            j_hi = max(j_hi, boxes[s, 3])
    return max(i_lo, 0), min(i_hi, on[0] - 1), max(j_lo, 0), min(j_hi, on[1] - 1)


def compose_subs(out, occ, on, shift, sdata, smask, offs, sns, S, aligned, boxes, order, spans, soffs, lo):
    """The rigid sub-volumes written where their masks (nearest voxel) are set, in ``order``
    (the last written wins: pass the reverse of the priority order). Parallel over output
    planes, each plane visiting the sub-volumes in order (``subs_part_row``; the CUDA kernel
    runs a thread per row, ``subs_row``).

    ``S`` (n, 3, 4): base index -> sub index; ``aligned`` (n, 4): (t, 1) when S is the
    translation by -t (the sub's voxels are copied as stored: at its own place a sub-volume
    gives back the CT voxel for voxel), else (0, 0, 0, 0); ``boxes`` (n, 6): the inclusive
    output voxel ranges to visit. ``spans`` (2, sum of rows): per sub-volume row (a, b), the
    first and last masked c (first > last: none), from row ``soffs[s]`` on."""
    i_lo, i_hi, j_lo, j_hi = subs_span(on, boxes, order)
    for i in prange(i_lo, i_hi + 1):  # noqa: F821 (prange: a global of the build namespace)
        for q in range(order.shape[0]):
            s = order[q]
            if i >= boxes[s, 0] and i <= boxes[s, 1]:
                for j in range(boxes[s, 2], boxes[s, 3] + 1):
                    subs_part_row(out, occ, on, shift, sdata, smask, offs, sns, S, aligned, boxes, spans, soffs,
                                  lo, i, j, s)


def occupancy_par(flat, nz_table, nx, ny, nz, bs):
    """projector.occupancy_grid, parallel over block slabs (the same grid)."""
    onx = (nx + bs - 1) // bs
    ony = (ny + bs - 1) // bs
    onz = (nz + bs - 1) // bs
    occ = np.zeros((onx, ony, onz), np.uint8)
    for bi in prange(onx):  # noqa: F821 (prange: a global of the build namespace)
        for i in range(bi * bs, min(bi * bs + bs + 1, nx)):
            for j in range(ny):
                jb = j // bs
                jb2 = (j - 1) // bs if j > 0 else jb
                base = (i * ny + j) * nz
                for k in range(nz):
                    if nz_table[flat[base + k] & 0xFFFF]:
                        kb = k // bs
                        kb2 = (k - 1) // bs if k > 0 else kb
                        occ[bi, jb, kb] = 1
                        occ[bi, jb2, kb] = 1
                        occ[bi, jb, kb2] = 1
                        occ[bi, jb2, kb2] = 1
    return occ


def occ_block_empty(out, on, lo, a, b, c):
    """Whether every trilinear sample whose floor index lies in block (a, b, c) of the frame ``out``
    (flat HU, shape ``on``) is 0: no voxel of the block, nor of the next voxel layer on each axis (the
    range ``projector.occupancy_grid`` reads, clipped at the grid), is above ``lo`` (the HU at and
    below which mu is 0, the rule the composition kernels mark by). Returns at the first row holding one."""
    n1 = on[1]
    n2 = on[2]
    i0 = a * BLOCK
    j0 = b * BLOCK
    k0 = c * BLOCK
    i1 = min(i0 + BLOCK, on[0] - 1)
    j1 = min(j0 + BLOCK, n1 - 1)
    k1 = min(k0 + BLOCK, n2 - 1)
    for i in range(i0, i1 + 1):
        for j in range(j0, j1 + 1):
            row = (i * n1 + j) * n2
            m = out[row + k0]
            for k in range(k0 + 1, k1 + 1):  # a row's maximum, then one test (a loop without exits)
                m = max(m, out[row + k])
            if m > lo:
                return False
    return True


def refine_occ(out, on, lo, occ):
    """Clear the marked blocks of ``occ`` (the frame's BLOCK^3 grid, a superset of the exact one) in
    which every sample is 0 (``occ_block_empty``): the exact grid of the composed voxels. Reads the
    voxels of marked blocks only, up to the first row that holds a non-air voxel."""
    for a in prange(occ.shape[0]):  # noqa: F821 (prange: a global of the build namespace)
        for b in range(occ.shape[1]):
            for c in range(occ.shape[2]):
                if occ[a, b, c] != 0 and occ_block_empty(out, on, lo, a, b, c):
                    occ[a, b, c] = 0


def warp_cells(disp):
    """The warp cells with a moved (non-zero or NaN) node, (m, 3)."""
    wa, wb, wc = disp.shape[0], disp.shape[1], disp.shape[2]
    flag = np.zeros((wa, wb, wc), np.uint8)
    for a in prange(wa):  # noqa: F821 (prange: a global of the build namespace)
        for b in range(wb):
            for c in range(wc):
                if disp[a, b, c, 0] != 0.0 or disp[a, b, c, 1] != 0.0 or disp[a, b, c, 2] != 0.0:
                    flag[a, b, c] = 1  # NaN != 0 too
    na = max(wa - 1, 0)
    count = np.zeros(na + 1, np.int64)
    for a in prange(na):  # noqa: F821 (prange: a global of the build namespace)
        n = 0
        for b in range(wb - 1):
            for c in range(wc - 1):
                if (flag[a, b, c] | flag[a, b, c + 1] | flag[a, b + 1, c] | flag[a, b + 1, c + 1]
                        | flag[a + 1, b, c] | flag[a + 1, b, c + 1] | flag[a + 1, b + 1, c]
                        | flag[a + 1, b + 1, c + 1]):
                    n += 1
        count[a + 1] = n
    start = np.cumsum(count)
    cells = np.empty((start[na], 3), np.int64)
    for a in prange(na):  # noqa: F821 (prange: a global of the build namespace)
        n = start[a]
        for b in range(wb - 1):
            for c in range(wc - 1):
                if (flag[a, b, c] | flag[a, b, c + 1] | flag[a, b + 1, c] | flag[a, b + 1, c + 1]
                        | flag[a + 1, b, c] | flag[a + 1, b, c + 1] | flag[a + 1, b + 1, c]
                        | flag[a + 1, b + 1, c + 1]):
                    cells[n, 0] = a
                    cells[n, 1] = b
                    cells[n, 2] = c
                    n += 1
    return cells


def mark_box(dirty, boxes, m):
    """Set ``dirty`` (the output's BLOCK^3 grid) over the blocks that the inclusive output voxel
    box m of ``boxes`` (m, 6) = (i0, i1, j0, j1, k0, k1) touches (an empty box, i1 < i0, sets none)."""
    if boxes[m, 1] >= boxes[m, 0] and boxes[m, 3] >= boxes[m, 2] and boxes[m, 5] >= boxes[m, 4]:
        for a in range(max(boxes[m, 0], 0) // BLOCK, min(boxes[m, 1] // BLOCK, dirty.shape[0] - 1) + 1):
            for b in range(max(boxes[m, 2], 0) // BLOCK, min(boxes[m, 3] // BLOCK, dirty.shape[1] - 1) + 1):
                for c in range(max(boxes[m, 4], 0) // BLOCK, min(boxes[m, 5] // BLOCK, dirty.shape[2] - 1) + 1):
                    dirty[a, b, c] = 1


def mark_boxes(dirty, boxes):
    """``mark_box`` for every box of ``boxes``."""
    for m in range(boxes.shape[0]):
        mark_box(dirty, boxes, m)


def restore_row(out, on, shift, base, bn, lo, i, j, k0, k1):
    """Voxels k0 <= k < k1 of output row (i, j) back to their clean content: the base voxel where
    the row lies on the base (at ``shift``), ``lo`` (air) elsewhere."""
    n1 = on[1]
    n2 = on[2]
    bi = i - shift[0]
    bj = j - shift[1]
    row = (i * n1 + j) * n2
    if bi >= 0 and bi < bn[0] and bj >= 0 and bj < bn[1]:
        brow = (bi * bn[1] + bj) * bn[2] - shift[2]
        m0 = min(max(shift[2], k0), k1)
        m1 = max(min(shift[2] + bn[2], k1), m0)
        for k in range(k0, m0):
            out[row + k] = lo
        for k in range(m0, m1):
            out[row + k] = base[brow + k]
        for k in range(m1, k1):
            out[row + k] = lo
    else:
        for k in range(k0, k1):
            out[row + k] = lo


def restore_blocks(out, on, shift, base, bn, dirty, lo):
    """Give the marked BLOCK^3 blocks of ``out`` (shape ``on``) back their clean content
    (``restore_row``)."""
    n1 = on[1]
    n2 = on[2]
    for a in prange(dirty.shape[0]):  # noqa: F821 (prange: a global of the build namespace)
        for b in range(dirty.shape[1]):
            for c in range(dirty.shape[2]):
                if dirty[a, b, c] == 0:
                    continue
                for i in range(a * BLOCK, min(a * BLOCK + BLOCK, on[0])):
                    for j in range(b * BLOCK, min(b * BLOCK + BLOCK, n1)):
                        restore_row(out, on, shift, base, bn, lo, i, j, c * BLOCK, min(c * BLOCK + BLOCK, n2))


# CUDA drivers of the composition bodies above (one thread per warp cell, output row, block row or box).
def cuda_compose_warp(out, occ, on, shift, base, bn, focc, fcum, G, Ginv, wn, disp, B, lo, dirty, diag):
    """``compose_warp`` over every warp cell with a moved node (no cell list: a thread per cell)."""
    p = cuda.grid(1)  # noqa: F821 (cuda: a global of the build namespace)
    nb = wn[1] - 1
    nc = wn[2] - 1
    if p < (wn[0] - 1) * nb * nc:
        ca = p // (nb * nc)
        r = p - ca * nb * nc
        cb = r // nc
        cc = r - cb * nc
        if cell_moved(disp, ca, cb, cc):
            d = cuda.local.array((8, 3), numba.float64)  # noqa: F821
            warp_cell(out, occ, on, shift, base, bn, focc, fcum, G, Ginv, wn, disp, B, lo, dirty, diag, d,
                      ca, cb, cc)


def cuda_compose_subs(out, occ, on, shift, sdata, smask, offs, sns, S, aligned, boxes, order, spans, soffs, lo,
                      i_lo, j_lo, ni, nj):
    """``compose_subs`` with a thread per output row (i, j) of the ni x nj rows from (i_lo, j_lo)."""
    p = cuda.grid(1)  # noqa: F821
    if p < ni * nj:
        i = i_lo + p // nj
        j = j_lo + p - (p // nj) * nj
        subs_row(out, occ, on, shift, sdata, smask, offs, sns, S, aligned, boxes, order, spans, soffs, lo, i, j)


def cuda_mark_boxes(dirty, boxes):
    m = cuda.grid(1)  # noqa: F821
    if m < boxes.shape[0]:
        mark_box(dirty, boxes, m)


def cuda_restore_blocks(out, on, shift, base, bn, dirty, lo, every):
    """``restore_blocks`` with a thread per block row (block, i, j); ``every``: all blocks (the
    clean frame from scratch), else the marked ones."""
    p = cuda.grid(1)  # noqa: F821
    d0 = dirty.shape[0]
    d1 = dirty.shape[1]
    d2 = dirty.shape[2]
    if p < d0 * d1 * d2 * BLOCK * BLOCK:
        blk = p // (BLOCK * BLOCK)
        r = p - blk * (BLOCK * BLOCK)
        a = blk // (d1 * d2)
        b = (blk // d2) - a * d1
        c = blk - (blk // d2) * d2
        i = a * BLOCK + r // BLOCK
        j = b * BLOCK + r - (r // BLOCK) * BLOCK
        if (every != 0 or dirty[a, b, c] != 0) and i < on[0] and j < on[1]:
            restore_row(out, on, shift, base, bn, lo, i, j, c * BLOCK, min(c * BLOCK + BLOCK, on[2]))


def cuda_refine_occ(out, on, lo, occ):
    """``refine_occ`` with a thread per block of ``occ``."""
    p = cuda.grid(1)  # noqa: F821
    d1 = occ.shape[1]
    d2 = occ.shape[2]
    if p < occ.shape[0] * d1 * d2:
        a = p // (d1 * d2)
        b = (p // d2) - a * d1
        c = p - (p // d2) * d2
        if occ[a, b, c] != 0 and occ_block_empty(out, on, lo, a, b, c):
            occ[a, b, c] = 0


def cuda_fill_u8(arr, src, copy):
    """``arr`` (flat uint8) := ``src`` (``copy`` != 0) or 0, a thread per element."""
    p = cuda.grid(1)  # noqa: F821
    if p < arr.shape[0]:
        arr[p] = src[p] if copy != 0 else 0


def cuda_clean_occ(out, bocc, o0, o1, o2, b0, b1, b2, s0, s1, s2):
    """A composed grid's clean empty-space grid (``projector._base_occupancy``) from the base's, on the
    device, a thread per block of the grid (o0 x o1 x o2 blocks): the base's b0 x b1 x b2 blocks
    ``bocc`` shifted by (s0, s1, s2) blocks, and on each axis with a shift the layer before the base's
    first one OR-ed with it (in axis order, which is the OR over the product of each axis's one or two
    source layers)."""
    p = cuda.grid(1)  # noqa: F821
    if p < o0 * o1 * o2:
        a = p // (o1 * o2)
        r = p - a * (o1 * o2)
        b = r // o2
        c = r - b * o2
        v = 0
        for ia in range(2):
            if ia == 1 and not (s0 > 0 and a == s0 - 1):
                continue
            i = (a if ia == 0 else s0) - s0
            for ib in range(2):
                if ib == 1 and not (s1 > 0 and b == s1 - 1):
                    continue
                j = (b if ib == 0 else s1) - s1
                for ic in range(2):
                    if ic == 1 and not (s2 > 0 and c == s2 - 1):
                        continue
                    k = (c if ic == 0 else s2) - s2
                    if i >= 0 and j >= 0 and k >= 0 and i < b0 and j < b1 and k < b2:
                        v |= bocc[(i * b1 + j) * b2 + k]
        out[p] = v


# (function, numba.njit options besides cache=True), compiled by _compose_build()
_COMPOSE_DEFS = (
    ("claims", {"inline": "always"}),
    ("lerp3", {"inline": "always"}),
    ("_hu_at_ijk", {"inline": "always"}),
    ("_hu_at", {"inline": "always"}),
    ("_to_i16", {"inline": "always"}),
    ("_mark", {"inline": "always"}),
    ("_mark_new", {"inline": "always"}),
    ("_any_occ", {"inline": "always"}),
    ("warp_diag", {"inline": "always"}),
    ("cell_moved", {"inline": "always"}),
    ("warp_cell", {"inline": "always"}),
    ("subs_part_row", {"inline": "always"}),
    ("subs_row", {"inline": "always"}),
    ("subs_span", {"inline": "always"}),
    ("mark_box", {"inline": "always"}),
    ("restore_row", {"inline": "always"}),
    ("occ_block_empty", {"inline": "always"}),
    ("compose_warp", {"parallel": True}),
    ("compose_subs", {"parallel": True}),
    ("occupancy_par", {"parallel": True}),
    ("warp_cells", {}),  # serial: 3-7 ms; its three parallel loops cost 77-112 ms on the loaded 2-core machine
    ("mark_boxes", {}),
    ("restore_blocks", {"parallel": True}),
    # serial: reading the marked blocks costs 0.8 ms (real CT frame) to 35 ms (phantom, 2,600 emptied
    # blocks read in full) on the loaded 2-core machine; parallel, 24-27 ms for either (the threads' wait)
    ("refine_occ", {}),
)
# the per-element bodies that the CUDA drivers share with the CPU ones (device functions there)
_COMPOSE_SHARED = ("claims", "lerp3", "_hu_at_ijk", "_hu_at", "_to_i16", "_mark", "_mark_new", "_any_occ",
                   "warp_diag", "cell_moved", "warp_cell", "subs_part_row", "subs_row", "subs_span", "mark_box",
                   "restore_row", "occ_block_empty")
_COMPOSE_CUDA = ("cuda_compose_warp", "cuda_compose_subs", "cuda_mark_boxes", "cuda_restore_blocks", "cuda_fill_u8",
                 "cuda_clean_occ", "cuda_refine_occ")


def _compose_build():
    """Compile the composition kernels above over one namespace dict (see the note above them)."""
    import numba

    opts = dict(_COMPOSE_DEFS)
    ns = compile_shared(globals(), opts, lambda f: numba.njit(f, cache=True, **opts[f.__name__]),
                        {"prange": numba.prange})
    return {"warp": ns["compose_warp"], "subs": ns["compose_subs"], "occupancy": ns["occupancy_par"],
            "warp_cells": ns["warp_cells"], "mark_boxes": ns["mark_boxes"], "restore_blocks": ns["restore_blocks"],
            "refine_occ": ns["refine_occ"]}


_COMPOSE = None
_COMPOSE_GPU = None


def compose_kernels() -> dict:
    """{'warp', 'subs', 'occupancy', ...}: the CPU scene-composition kernels (compiled lazily)."""
    global _COMPOSE
    if _COMPOSE is None:
        _COMPOSE = _compose_build()
    return _COMPOSE


def compose_cuda_namespace(decorate, extra: dict) -> dict:
    """The composition bodies compiled with ``decorate`` (CUDA device functions) in a fresh namespace."""
    return compile_shared(globals(), _COMPOSE_SHARED, decorate, extra)


def compose_cuda_kernels() -> dict:
    """{'warp', 'subs', 'mark_boxes', 'restore_blocks', 'fill_u8', 'clean_occ'}: the CUDA scene-composition
    kernels, built from the same bodies as the CPU ones (compiled lazily)."""
    global _COMPOSE_GPU
    if _COMPOSE_GPU is None:
        import numba
        from numba import cuda

        ns = compose_cuda_namespace(lambda f: cuda.jit(device=True)(f), {"cuda": cuda, "numba": numba})
        _COMPOSE_GPU = {name[len("cuda_"):].replace("compose_", ""): cuda.jit(
            types.FunctionType(globals()[name].__code__, ns, name)) for name in _COMPOSE_CUDA}
    return _COMPOSE_GPU
