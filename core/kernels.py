"""DRR kernels: one body per ray, compiled for the CPU (numba parallel) and for CUDA (numba-cuda).

The per-ray functions below are plain Python on scalars and arrays. ``_build(decorate)`` makes a
fresh copy of each with a namespace in which the names of the other per-ray functions refer to
compiled versions: ``numba.njit`` for the CPU, ``numba.cuda.jit(device=True)`` for CUDA. So the CPU
and the GPU run the same code; only the drivers differ (a ``prange`` loop over pixels versus one
CUDA thread per pixel).

Conventions (see core/projector.py for the host side):
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
"""
from __future__ import annotations

import math
import types

import numpy as np

MAX_CAND = 64  # rigid sub-volumes a single ray may cross (render_scene)
BLOCK = 8  # edge of the empty-space blocks, in voxels (a compile-time constant)


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
    return lut[pat & 0xFFFF]


def finish(v, lin_a, lin_b):
    """Interpolated value -> mu. In linear mode mu = a HU + b is exact after interpolation, because
    HU clamped at lin_lo (where mu reaches 0) keeps mu linear in HU: clamping then interpolating
    HU equals interpolating the clipped mu."""
    if lin_a != 0.0:
        return lin_a * v + lin_b
    return v


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
    c00 = c000 + (c001 - c000) * fz
    c01 = c010 + (c011 - c010) * fz
    c10 = c100 + (c101 - c100) * fz
    c11 = c110 + (c111 - c110) * fz
    c0 = c00 + (c01 - c00) * fy
    c1 = c10 + (c11 - c10) * fy
    return finish(c0 + (c1 - c0) * fx, lin_a, lin_b)


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
        if bid != last:
            last = bid
            if occ[bid] == 0 and inside:
                te = block_exit(px, py, pz, qx, qy, qz, bi, bj, bk, BLOCK)
                mn = int(math.ceil((te - t0) / h - 0.5))
                if mn > m:
                    m = mn
                    last = -1
                    continue
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
        fx = x - i
        fy = y - j
        fz = z - k
        c00 = c000 + (c001 - c000) * fz
        c01 = c010 + (c011 - c010) * fz
        c10 = c100 + (c101 - c100) * fz
        c11 = c110 + (c111 - c110) * fz
        c0 = c00 + (c01 - c00) * fy
        c1 = c10 + (c11 - c10) * fy
        acc += c0 + (c1 - c0) * fx
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
    c00 = c000 + (c001 - c000) * fz
    c01 = c010 + (c011 - c010) * fz
    c10 = c100 + (c101 - c100) * fz
    c11 = c110 + (c111 - c110) * fz
    c0 = c00 + (c01 - c00) * fy
    c1 = c10 + (c11 - c10) * fy
    return c0 + (c1 - c0) * fx


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
    while t < t1:
        bi = i // BLOCK
        bj = j // BLOCK
        bk = k // BLOCK
        bid = (bi * ony + bj) * onz + bk
        if bid != last:
            last = bid
            if occ[bid] == 0:
                # shift by half a voxel: cell faces i + 0.5 become the block grid's integer planes
                te = block_exit(px + 0.5, py + 0.5, pz + 0.5, qx, qy, qz, bi, bj, bk, BLOCK)
                if te >= t1:
                    break
                if te > t:
                    t = te
                    tm = t + 1e-9 * (t1 - t0)
                    i, tx, si, ddx = siddon_axis(px, qx, nx, tm)
                    j, ty, sj, ddy = siddon_axis(py, qy, ny, tm)
                    k, tz, sk, ddz = siddon_axis(pz, qz, nz, tm)
                    continue
        tn = min(tx, min(ty, tz))
        if tn > t1:
            tn = t1
        acc += (tn - t) * finish(raw_val(data[i * sny + j * snz + k], lut, lin_a, lin_lo), lin_a, lin_b)
        t = tn
        if tn == tx:
            i += si
            tx += ddx
            if i < 0 or i >= nx:
                break
        elif tn == ty:
            j += sj
            ty += ddy
            if j < 0 or j >= ny:
                break
        else:
            k += sk
            tz += ddz
            if k < 0 or k >= nz:
                break
    return acc


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
        c00 = disp[i, j, k, a] + (disp[i, j, k1, a] - disp[i, j, k, a]) * fz
        c01 = disp[i, j1, k, a] + (disp[i, j1, k1, a] - disp[i, j1, k, a]) * fz
        c10 = disp[i1, j, k, a] + (disp[i1, j, k1, a] - disp[i1, j, k, a]) * fz
        c11 = disp[i1, j1, k, a] + (disp[i1, j1, k1, a] - disp[i1, j1, k, a]) * fz
        c0 = c00 + (c01 - c00) * fy
        c1 = c10 + (c11 - c10) * fy
        val = c0 + (c1 - c0) * fx
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
                ni = min(max(int(math.floor(ix + 0.5)), 0), snx - 1)
                nj = min(max(int(math.floor(iy + 0.5)), 0), sny - 1)
                nk = min(max(int(math.floor(iz + 0.5)), 0), snz - 1)
                off = int(sparams[s, 0])
                if smask[off + (ni * sny + nj) * snz + nk] != 0:
                    acc += trilinear(sdata, slut, slin_a, slin_b, slin_lo, off, snx, sny, snz, ix, iy, iz)
                    claimed = True
                    break
        if not claimed:
            wx = x
            wy = y
            wz = z
            if use_warp:
                wx, wy, wz = warp_point(disp, WM, wn, x, y, z)
            bx, by, bz = to_index(BM, wx, wy, wz)
            if (bx >= -0.5 and by >= -0.5 and bz >= -0.5 and bx <= bnx - 0.5 and by <= bny - 0.5
                    and bz <= bnz - 0.5):
                acc += trilinear(bdata, blut, blin_a, blin_b, blin_lo, 0, bnx, bny, bnz, bx, by, bz)
    return acc * h


_PER_RAY = ("pixel_ray", "to_index", "slab", "ray_box", "raw_val", "finish", "trilinear", "trilinear_ijk",
            "block_exit", "first_break", "corner_eval", "ray_exact", "ray_trilinear",
            "siddon_axis", "ray_siddon", "warp_point", "ray_scene")


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
        if method == 1:
            out[r, c] = ray_siddon(data, lut, lin_a, lin_b, lin_lo, nx, ny, nz, M, occ, ox, oy, oz, dx, dy, dz, tlen)
        elif method == 2:
            out[r, c] = ray_exact(data, lut, lin_a, lin_b, lin_lo, nx, ny, nz, M, occ, ox, oy, oz, dx,
                                  dy, dz, tlen)
        else:
            out[r, c] = ray_trilinear(data, lut, lin_a, lin_b, lin_lo, nx, ny, nz, M, occ, ox, oy, oz, dx, dy,
                                      dz, tlen, step)


def cpu_batch(out, geos, data, lut, lin_a, lin_b, lin_lo, nx, ny, nz, M, occ, step, method):
    B = out.shape[0]
    H = out.shape[1]
    W = out.shape[2]
    for p in prange(B * H * W):  # noqa: F821
        v = p // (H * W)
        q = p - v * H * W
        r = q // W
        c = q - r * W
        ox, oy, oz, dx, dy, dz, tlen = pixel_ray(geos[v], r, c)
        if method == 1:
            out[v, r, c] = ray_siddon(data, lut, lin_a, lin_b, lin_lo, nx, ny, nz, M, occ, ox, oy, oz, dx, dy, dz, tlen)
        elif method == 2:
            out[v, r, c] = ray_exact(data, lut, lin_a, lin_b, lin_lo, nx, ny, nz, M, occ, ox, oy, oz, dx,
                                     dy, dz, tlen)
        else:
            out[v, r, c] = ray_trilinear(data, lut, lin_a, lin_b, lin_lo, nx, ny, nz, M, occ, ox, oy, oz,
                                         dx, dy, dz, tlen, step)


def cuda_batch(out, geos, data, lut, lin_a, lin_b, lin_lo, nx, ny, nz, M, occ, step, method):
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
        if method == 1:
            out[v, r, c] = ray_siddon(data, lut, lin_a, lin_b, lin_lo, nx, ny, nz, M, occ, ox, oy, oz, dx, dy, dz, tlen)
        elif method == 2:
            out[v, r, c] = ray_exact(data, lut, lin_a, lin_b, lin_lo, nx, ny, nz, M, occ, ox, oy, oz, dx,
                                     dy, dz, tlen)
        else:
            out[v, r, c] = ray_trilinear(data, lut, lin_a, lin_b, lin_lo, nx, ny, nz, M, occ, ox, oy, oz,
                                         dx, dy, dz, tlen, step)


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
        if method == 1:
            out[r, c] = ray_siddon(data, lut, lin_a, lin_b, lin_lo, nx, ny, nz, M, occ, ox, oy, oz, dx, dy, dz, tlen)
        elif method == 2:
            out[r, c] = ray_exact(data, lut, lin_a, lin_b, lin_lo, nx, ny, nz, M, occ, ox, oy, oz, dx,
                                  dy, dz, tlen)
        else:
            out[r, c] = ray_trilinear(data, lut, lin_a, lin_b, lin_lo, nx, ny, nz, M, occ, ox, oy, oz, dx, dy,
                                      dz, tlen, step)


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


def _build(decorate, extra: dict) -> dict:
    """Compile the per-ray functions with ``decorate`` into a fresh namespace and return it."""
    ns = dict(globals())
    ns.update(extra)
    for name in _PER_RAY:
        f = globals()[name]
        ns[name] = decorate(types.FunctionType(f.__code__, ns, name, f.__defaults__))
    return ns


_CPU = None
_CUDA = None


def cpu_kernels() -> dict:
    """{'static': ..., 'scene': ...} numba-parallel CPU drivers (compiled lazily, cached on disk)."""
    global _CPU
    if _CPU is None:
        import numba

        ns = _build(lambda f: numba.njit(f, cache=True, fastmath=True),
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
