"""The full-body CT phantom with ground truth at any pose.

``generate_phantom(pose, spacing, seed, noise_hu)`` voxelises the anatomy of ``core.phantom.anatomy`` posed by
a 72-float SMPL pose (``core.rig.poses``) onto an axis-aligned LPS grid:

- every structure is attached to one SMPL segment and placed by that segment's rigid transform
  ``T_j = A_j(pose) + transl`` (``core.body.skeleton.forward_kinematics`` on the anatomical rest joints),
  so each bone is an exact rigid copy of its canonical rest; ``truth["bones"][name] = T_j``;
- the body outline is the smooth minimum of per-segment flesh primitives, each evaluated in its
  own segment's frame: soft tissue follows the limbs without tearing; skin, subcutaneous fat and
  muscle are layers below that outline; organs and bones override the layers by priority;
- partial volume: a voxel whose centre is closer than half its diagonal to any tissue interface is
  sampled at ``subsamples``^3 points; its HU is the mean and its label the most frequent one;
- bones have a cortical shell (~1450 HU) over a cancellous core (~220-300 HU) with a seeded texture
  that is fixed in the bone's frame; a patient table (label ``table``) is static in world and
  yields to the body where a limb reaches into it; optional seeded Gaussian noise.

The grid lattice is the multiples of ``spacing`` in world mm, so phantoms of one seed at two poses
share voxel centres. The seed picks the body shape (seed 0 = the default adult) and same seed,
same arguments -> same bytes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .anatomy import CONE, ELL, NPARAM, PLANE, TRI, UNION, build_anatomy
from ..errors import CtwinError
from ..volumes.labels import is_skeletal, name_to_id, all_names
from ..progress import report
from ..body.skeleton import JOINT_NAMES, PARENTS, forward_kinematics, rodrigues
from ..volumes.volume import Volume, affine_from, save_nifti
from ..fileio import write_json
from ..rig.pose import _slerp_matrices
from ..rig.poses import ACQUISITION_PRESETS, PRESETS, resolve_pose
from ..rig.retarget import retarget_pose

try:  # numba is a hard dependency of the project; the fallback only keeps imports working
    from numba import njit
except ImportError:  # pragma: no cover
    def njit(*a, **k):
        def deco(f):
            return f
        return deco if not (a and callable(a[0])) else a[0]

HU_AIR = -1000.0
HU_SKIN = 30.0
HU_FAT = -100.0
HU_MUSCLE = 45.0
HU_TABLE_SHELL = 450.0
HU_TABLE_CORE = -850.0
TABLE_HALF_WIDTH = 250.0
TABLE_THICKNESS = 45.0
TABLE_SHELL = 4.0


@dataclass
class Phantom:
    ct: Volume       # int16 HU
    seg: Volume      # uint16 label ids
    labels: dict     # id -> name (ids present in seg)
    truth: dict      # SPEC section 4: pose, transl, joints, bones (+ extras)


# ------------------------------------------------------------------------------------------------
# numba kernels

@njit(cache=True, inline="always")
def _sdf(t, P, o, x, y, z):
    if t == 0:  # round cone
        ax, ay, az = P[o], P[o + 1], P[o + 2]
        bax, bay, baz = P[o + 3] - ax, P[o + 4] - ay, P[o + 5] - az
        r1, r2 = P[o + 6], P[o + 7]
        l2 = bax * bax + bay * bay + baz * baz
        rr = r1 - r2
        a2 = l2 - rr * rr
        il2 = 1.0 / l2
        pax, pay, paz = x - ax, y - ay, z - az
        yy = pax * bax + pay * bay + paz * baz
        zz = yy - l2
        cx, cy, cz = pax * l2 - bax * yy, pay * l2 - bay * yy, paz * l2 - baz * yy
        x2 = cx * cx + cy * cy + cz * cz
        y2 = yy * yy * l2
        z2 = zz * zz * l2
        k = rr * rr * x2
        if rr < 0:
            k = -k
        sz = 1.0 if zz > 0 else (-1.0 if zz < 0 else 0.0)
        sy = 1.0 if yy > 0 else (-1.0 if yy < 0 else 0.0)
        if sz * a2 * z2 > k:
            return math.sqrt(x2 + z2) * il2 - r2
        if sy * a2 * y2 < k:
            return math.sqrt(x2 + y2) * il2 - r1
        return (math.sqrt(x2 * a2 * il2) + yy * rr) * il2 - r1
    if t == 1 or t == 3:  # ellipsoid / rounded box: local coordinates first
        dx, dy, dz = x - P[o], y - P[o + 1], z - P[o + 2]
        lx = P[o + 3] * dx + P[o + 4] * dy + P[o + 5] * dz
        ly = P[o + 6] * dx + P[o + 7] * dy + P[o + 8] * dz
        lz = P[o + 9] * dx + P[o + 10] * dy + P[o + 11] * dz
        if t == 1:
            rx, ry, rz = P[o + 12], P[o + 13], P[o + 14]
            k0 = math.sqrt((lx / rx) ** 2 + (ly / ry) ** 2 + (lz / rz) ** 2)
            k1 = math.sqrt((lx / (rx * rx)) ** 2 + (ly / (ry * ry)) ** 2 + (lz / (rz * rz)) ** 2)
            if k1 < 1e-12:
                return -min(rx, min(ry, rz))
            return k0 * (k0 - 1.0) / k1
        r = P[o + 15]
        qx = abs(lx) - P[o + 12] + r
        qy = abs(ly) - P[o + 13] + r
        qz = abs(lz) - P[o + 14] + r
        mx, my, mz = max(qx, 0.0), max(qy, 0.0), max(qz, 0.0)
        return math.sqrt(mx * mx + my * my + mz * mz) + min(max(qx, max(qy, qz)), 0.0) - r
    if t == 2:  # triangle slab
        ax, ay, az = P[o], P[o + 1], P[o + 2]
        bx, by, bz = P[o + 3], P[o + 4], P[o + 5]
        cx, cy, cz = P[o + 6], P[o + 7], P[o + 8]
        bax, bay, baz = bx - ax, by - ay, bz - az
        pax, pay, paz = x - ax, y - ay, z - az
        cbx, cby, cbz = cx - bx, cy - by, cz - bz
        pbx, pby, pbz = x - bx, y - by, z - bz
        acx, acy, acz = ax - cx, ay - cy, az - cz
        pcx, pcy, pcz = x - cx, y - cy, z - cz
        nx = bay * acz - baz * acy
        ny = baz * acx - bax * acz
        nz = bax * acy - bay * acx
        # sign tests
        s1x, s1y, s1z = bay * nz - baz * ny, baz * nx - bax * nz, bax * ny - bay * nx
        s2x, s2y, s2z = cby * nz - cbz * ny, cbz * nx - cbx * nz, cbx * ny - cby * nx
        s3x, s3y, s3z = acy * nz - acz * ny, acz * nx - acx * nz, acx * ny - acy * nx
        d1 = s1x * pax + s1y * pay + s1z * paz
        d2 = s2x * pbx + s2y * pby + s2z * pbz
        d3 = s3x * pcx + s3y * pcy + s3z * pcz
        sg = (1.0 if d1 > 0 else (-1.0 if d1 < 0 else 0.0)) + (1.0 if d2 > 0 else (-1.0 if d2 < 0 else 0.0)) \
            + (1.0 if d3 > 0 else (-1.0 if d3 < 0 else 0.0))
        if sg < 2.0:
            t1 = min(max((bax * pax + bay * pay + baz * paz) / (bax * bax + bay * bay + baz * baz), 0.0), 1.0)
            e1 = (bax * t1 - pax) ** 2 + (bay * t1 - pay) ** 2 + (baz * t1 - paz) ** 2
            t2 = min(max((cbx * pbx + cby * pby + cbz * pbz) / (cbx * cbx + cby * cby + cbz * cbz), 0.0), 1.0)
            e2 = (cbx * t2 - pbx) ** 2 + (cby * t2 - pby) ** 2 + (cbz * t2 - pbz) ** 2
            t3 = min(max((acx * pcx + acy * pcy + acz * pcz) / (acx * acx + acy * acy + acz * acz), 0.0), 1.0)
            e3 = (acx * t3 - pcx) ** 2 + (acy * t3 - pcy) ** 2 + (acz * t3 - pcz) ** 2
            dd = min(e1, min(e2, e3))
        else:
            dn = nx * pax + ny * pay + nz * paz
            dd = dn * dn / (nx * nx + ny * ny + nz * nz)
        return math.sqrt(dd) - P[o + 9]
    # plane
    return P[o] * x + P[o + 1] * y + P[o + 2] * z - P[o + 3]


@njit(cache=True, inline="always")
def _hash01(ix, iy, iz, seed):
    h = (ix * 374761393 + iy * 668265263 + iz * 2246822519 + seed * 3266489917) & 0xFFFFFFFF
    h = ((h ^ (h >> 15)) * 2246822519) & 0xFFFFFFFF
    h = ((h ^ (h >> 13)) * 3266489917) & 0xFFFFFFFF
    h = h ^ (h >> 16)
    return h * (2.0 / 4294967295.0) - 1.0


@njit(cache=True)
def _noise(x, y, z, cell, seed):
    fx, fy, fz = x / cell, y / cell, z / cell
    ix, iy, iz = math.floor(fx), math.floor(fy), math.floor(fz)
    tx, ty, tz = fx - ix, fy - iy, fz - iz
    tx = tx * tx * (3.0 - 2.0 * tx)
    ty = ty * ty * (3.0 - 2.0 * ty)
    tz = tz * tz * (3.0 - 2.0 * tz)
    ix, iy, iz = int(ix), int(iy), int(iz)
    v = 0.0
    for a in range(2):
        wa = tx if a else 1.0 - tx
        for b in range(2):
            wb = ty if b else 1.0 - ty
            for c in range(2):
                wc = tz if c else 1.0 - tz
                v += wa * wb * wc * _hash01(ix + a, iy + b, iz + c, seed)
    return v


@njit(cache=True)
def _struct_hu(win, cort, qx, qy, qz, sinfo, seed):
    """HU of structure ``win`` at rest-frame point q (texture fixed in the structure's frame)."""
    amp = sinfo[win, 7]
    sd = seed * 1009 + win
    if int(sinfo[win, 3]) == 0:
        if cort:
            return sinfo[win, 4] + 0.5 * amp * _noise(qx, qy, qz, 3.0, sd)
        return sinfo[win, 5] + amp * _noise(qx, qy, qz, 3.0, sd)
    if amp > 0.0:
        return sinfo[win, 4] + amp * _noise(qx, qy, qz, 4.0, sd)
    return sinfo[win, 4]


@njit(cache=True)
def _eval_point(x, y, z, seg_inv, fprims, flist, nf, sprims, sinfo, slist, ns, plist, sstart, send, table, trel,
                skin_t, fat_t, kblend, seed, full):
    """(label, hu, interface distance) at world point (x, y, z). ``full``: compute the distance."""
    big = 1e9
    D = big
    for ii in range(nf):
        f = flist[ii]
        s = int(fprims[f, 1])
        M = seg_inv[s]
        qx = M[0, 0] * x + M[0, 1] * y + M[0, 2] * z + M[0, 3]
        qy = M[1, 0] * x + M[1, 1] * y + M[1, 2] * z + M[1, 3]
        qz = M[2, 0] * x + M[2, 1] * y + M[2, 2] * z + M[2, 3]
        d = _sdf(int(fprims[f, 0]), fprims[f], 4, qx, qy, qz) - fprims[f, 3]
        hh = max(kblend - abs(D - d), 0.0) / kblend
        D = min(D, d) - hh * hh * kblend * 0.25
    iface = abs(D)
    if D >= 0.0:
        if trel:
            cx = 0.5 * (table[0] + table[1])
            cy = 0.5 * (table[2] + table[3])
            cz = 0.5 * (table[4] + table[5])
            dt = max(abs(x - cx) - 0.5 * (table[1] - table[0]),
                     max(abs(y - cy) - 0.5 * (table[3] - table[2]), abs(z - cz) - 0.5 * (table[5] - table[4])))
            iface = min(iface, abs(dt))
            if dt < 0.0:
                e1 = y - (table[2] + table[6])
                e2 = (table[3] - table[6]) - y
                iface = min(iface, min(abs(e1), abs(e2)))
                if e1 < 0.0 or e2 < 0.0:
                    return 0xFFFF, HU_TABLE_SHELL, iface, -1, 0
                return 0xFFFF, HU_TABLE_CORE, iface, -1, 0
        return 0, HU_AIR, iface, -1, 0
    iface = min(iface, min(abs(D + skin_t), abs(D + fat_t)))
    win = -1
    dwin = 0.0
    wx, wy, wz = 0.0, 0.0, 0.0
    for ii in range(ns):
        si = slist[ii]
        st = sstart[ii]
        en = send[ii]
        s = int(sprims[plist[st], 1])
        M = seg_inv[s]
        qx = M[0, 0] * x + M[0, 1] * y + M[0, 2] * z + M[0, 3]
        qy = M[1, 0] * x + M[1, 1] * y + M[1, 2] * z + M[1, 3]
        qz = M[2, 0] * x + M[2, 1] * y + M[2, 2] * z + M[2, 3]
        du = big
        dsub = big
        dint = -big
        for rr in range(st, en):
            r = plist[rr]
            d = _sdf(int(sprims[r, 0]), sprims[r], 4, qx, qy, qz)
            op = int(sprims[r, 2])
            if op == 0:
                du = min(du, d)
            elif op == 1:
                dsub = min(dsub, d)
            else:
                dint = max(dint, d)
        ds = max(du, max(-dsub, dint))
        if full:
            iface = min(iface, abs(ds))
        if ds < 0.0 and win < 0:
            win = si
            dwin = ds
            wx, wy, wz = qx, qy, qz
            if not full:
                break
    if win >= 0:
        cort = 0
        if int(sinfo[win, 3]) == 0:
            ct = sinfo[win, 6]
            if full:
                iface = min(iface, abs(dwin + ct))
            if dwin > -ct:
                cort = 1
        return int(sinfo[win, 2]), _struct_hu(win, cort, wx, wy, wz, sinfo, seed), iface, win, cort
    if D > -skin_t:
        return -1, HU_SKIN, iface, -1, 0
    if D > -fat_t:
        return -2, HU_FAT, iface, -1, 0
    return -3, HU_MUSCLE, iface, -1, 0


@njit(cache=True)
def _voxelise(nx, ny, nz, ox, oy, oz, h, seg_inv, fprims, fbox, sprims, pbox, sinfo, sbox, table,
              skin_t, fat_t, kblend, seed, nsub, lab_skin, lab_fat, lab_muscle, lab_table,
              hu_out, lab_out):
    B = 8
    nF = fprims.shape[0]
    nS = sinfo.shape[0]
    rad = 0.5 * math.sqrt(3.0) * h * 1.05
    mf = 2.0 * kblend + fat_t + rad + h
    ms = rad + h
    n3 = nsub * nsub * nsub
    nbx = (nx + B - 1) // B
    nby = (ny + B - 1) // B
    nbz = (nz + B - 1) // B
    for bb in range(nbx * nby * nbz):
        bi = bb // (nby * nbz)
        bj = (bb // nbz) % nby
        bk = bb % nbz
        if True:
            if True:
                flist = np.empty(nF, np.int64)
                slist = np.empty(nS, np.int64)
                sstart = np.empty(nS, np.int64)
                send = np.empty(nS, np.int64)
                plist = np.empty(sprims.shape[0], np.int64)
                labs = np.empty(n3, np.int64)
                i0, j0, k0 = bi * B, bj * B, bk * B
                i1, j1, k1 = min(i0 + B, nx), min(j0 + B, ny), min(k0 + B, nz)
                lx, hx = ox + (i0 - 0.5) * h, ox + (i1 - 0.5) * h
                ly, hy = oy + (j0 - 0.5) * h, oy + (j1 - 0.5) * h
                lz, hz = oz + (k0 - 0.5) * h, oz + (k1 - 0.5) * h
                nf = 0
                for f in range(nF):
                    if (fbox[f, 0] <= hx + mf and fbox[f, 1] >= lx - mf and fbox[f, 2] <= hy + mf
                            and fbox[f, 3] >= ly - mf and fbox[f, 4] <= hz + mf and fbox[f, 5] >= lz - mf):
                        flist[nf] = f
                        nf += 1
                ns = 0
                npl = 0
                if nf > 0:
                    for s in range(nS):
                        if (sbox[s, 0] <= hx + ms and sbox[s, 1] >= lx - ms and sbox[s, 2] <= hy + ms
                                and sbox[s, 3] >= ly - ms and sbox[s, 4] <= hz + ms and sbox[s, 5] >= lz - ms):
                            first = npl
                            nu = 0
                            for r in range(int(sinfo[s, 0]), int(sinfo[s, 1])):
                                if sprims[r, 2] != 0:
                                    plist[npl] = r
                                    npl += 1
                                elif (pbox[r, 0] <= hx + ms and pbox[r, 1] >= lx - ms and pbox[r, 2] <= hy + ms
                                      and pbox[r, 3] >= ly - ms and pbox[r, 4] <= hz + ms and pbox[r, 5] >= lz - ms):
                                    plist[npl] = r
                                    npl += 1
                                    nu += 1
                            if nu == 0:
                                npl = first
                                continue
                            slist[ns] = s
                            sstart[ns] = first
                            send[ns] = npl
                            ns += 1
                trel = (table[0] <= hx + ms and table[1] >= lx - ms and table[2] <= hy + ms
                        and table[3] >= ly - ms and table[4] <= hz + ms and table[5] >= lz - ms)
                if nf == 0 and not trel:
                    for i in range(i0, i1):
                        for j in range(j0, j1):
                            for k in range(k0, k1):
                                hu_out[i, j, k] = -1000
                                lab_out[i, j, k] = 0
                    continue
                # sub-bricks of 4^3 voxels: one test at the centre decides whether all are pure
                for si0 in range(i0, i1, 4):
                    for sj0 in range(j0, j1, 4):
                        for sk0 in range(k0, k1, 4):
                            si1, sj1, sk1 = min(si0 + 4, i1), min(sj0 + 4, j1), min(sk0 + 4, k1)
                            cx = ox + 0.5 * (si0 + si1 - 1) * h
                            cy = oy + 0.5 * (sj0 + sj1 - 1) * h
                            cz = oz + 0.5 * (sk0 + sk1 - 1) * h
                            rb = 0.5 * h * math.sqrt((si1 - si0) ** 2 + (sj1 - sj0) ** 2 + (sk1 - sk0) ** 2) * 1.05
                            lab, hu, iface, win, cort = _eval_point(
                                cx, cy, cz, seg_inv, fprims, flist, nf, sprims, sinfo, slist, ns, plist, sstart,
                                send, table, trel, skin_t, fat_t, kblend, seed, True)
                            if iface > rb and lab != 0xFFFF:
                                lab = _final_label(lab, lab_skin, lab_fat, lab_muscle, lab_table)
                                M = seg_inv[int(sprims[int(sinfo[win, 0]), 1])] if win >= 0 else seg_inv[0]
                                for i in range(si0, si1):
                                    x = ox + i * h
                                    for j in range(sj0, sj1):
                                        y = oy + j * h
                                        for k in range(sk0, sk1):
                                            z = oz + k * h
                                            if win >= 0 and sinfo[win, 7] > 0.0:
                                                qx = M[0, 0] * x + M[0, 1] * y + M[0, 2] * z + M[0, 3]
                                                qy = M[1, 0] * x + M[1, 1] * y + M[1, 2] * z + M[1, 3]
                                                qz = M[2, 0] * x + M[2, 1] * y + M[2, 2] * z + M[2, 3]
                                                hu_out[i, j, k] = _to_i16(_struct_hu(win, cort, qx, qy, qz, sinfo, seed))
                                            else:
                                                hu_out[i, j, k] = _to_i16(hu)
                                            lab_out[i, j, k] = lab
                                continue
                            for i in range(si0, si1):
                                x = ox + i * h
                                for j in range(sj0, sj1):
                                    y = oy + j * h
                                    for k in range(sk0, sk1):
                                        z = oz + k * h
                                        lab, hu, iface, win, cort = _eval_point(
                                            x, y, z, seg_inv, fprims, flist, nf, sprims, sinfo, slist, ns, plist,
                                            sstart, send, table, trel, skin_t, fat_t, kblend, seed, True)
                                        if iface <= rad:
                                            acc = 0.0
                                            m = 0
                                            for a in range(nsub):
                                                xs = x + ((a + 0.5) / nsub - 0.5) * h
                                                for b in range(nsub):
                                                    ys = y + ((b + 0.5) / nsub - 0.5) * h
                                                    for c in range(nsub):
                                                        zs = z + ((c + 0.5) / nsub - 0.5) * h
                                                        l2, h2, _, _, _ = _eval_point(
                                                            xs, ys, zs, seg_inv, fprims, flist, nf, sprims, sinfo,
                                                            slist, ns, plist, sstart, send, table, trel, skin_t,
                                                            fat_t, kblend, seed, False)
                                                        acc += h2
                                                        labs[m] = l2
                                                        m += 1
                                            hu = acc / n3
                                            # majority label; a tie goes to the label at the centre
                                            best = lab
                                            bestc = 0
                                            for b in range(n3):
                                                if labs[b] == lab:
                                                    bestc += 2
                                            bestc += 1
                                            for a in range(n3):
                                                c = 0
                                                for b in range(n3):
                                                    if labs[b] == labs[a]:
                                                        c += 2
                                                if c > bestc:
                                                    bestc = c
                                                    best = labs[a]
                                            lab = best
                                        hu_out[i, j, k] = _to_i16(hu)
                                        lab_out[i, j, k] = _final_label(lab, lab_skin, lab_fat, lab_muscle, lab_table)


@njit(cache=True)
def _body_sdf_points(pts, seg_inv, fprims, kblend, out):
    for n in range(pts.shape[0]):
        x, y, z = pts[n, 0], pts[n, 1], pts[n, 2]
        D = 1e9
        for f in range(fprims.shape[0]):
            M = seg_inv[int(fprims[f, 1])]
            qx = M[0, 0] * x + M[0, 1] * y + M[0, 2] * z + M[0, 3]
            qy = M[1, 0] * x + M[1, 1] * y + M[1, 2] * z + M[1, 3]
            qz = M[2, 0] * x + M[2, 1] * y + M[2, 2] * z + M[2, 3]
            d = _sdf(int(fprims[f, 0]), fprims[f], 4, qx, qy, qz) - fprims[f, 3]
            hh = max(kblend - abs(D - d), 0.0) / kblend
            D = min(D, d) - hh * hh * kblend * 0.25
        out[n] = D


@njit(cache=True, inline="always")
def _to_i16(hu):
    return np.int16(min(max(math.floor(hu + 0.5), -1024.0), 3071.0))


@njit(cache=True, inline="always")
def _final_label(lab, lab_skin, lab_fat, lab_muscle, lab_table):
    if lab == -1:
        return lab_skin
    if lab == -2:
        return lab_fat
    if lab == -3:
        return lab_muscle
    if lab == 0xFFFF:
        return lab_table
    return lab


# ------------------------------------------------------------------------------------------------
# packing the anatomy for the kernel

def _prim_world_boxes(rows, T, pad=None) -> np.ndarray:
    """Tight world AABBs (N, 6: xlo, xhi, ylo, yhi, zlo, zhi) of packed primitives moved by T[seg].

    Exact for round cones, ellipsoids and triangle slabs, conservative for rounded boxes; planes and
    subtracted primitives get an infinite box.
    """
    out = np.empty((len(rows), 6))
    for i, r in enumerate(rows):
        t, tr, q = int(r[0]), T[int(r[1])], r[4:].copy()
        R, o = tr[:3, :3], tr[:3, 3]
        sc = abs(np.linalg.det(R)) ** (1.0 / 3.0)  # a skeleton variant scales segments
        if abs(sc - 1.0) > 1e-12:
            q[6:8] *= sc if t == CONE else 1.0
            q[9] *= sc if t == TRI else 1.0
        if (len(r) > 2 and r[2] != UNION and pad is None) or t == PLANE:
            out[i] = [-1e9, 1e9, -1e9, 1e9, -1e9, 1e9]
            continue
        if t == CONE:
            a, b = R @ q[0:3] + o, R @ q[3:6] + o
            lo, hi = np.minimum(a - q[6], b - q[7]), np.maximum(a + q[6], b + q[7])
        elif t == TRI:
            v = q[0:9].reshape(3, 3) @ R.T + o
            lo, hi = v.min(0) - q[9], v.max(0) + q[9]
        else:
            c = R @ q[0:3] + o
            m = R @ q[3:12].reshape(3, 3).T  # local axes in world (columns)
            if t == ELL:
                ext = np.sqrt(((m * q[12:15][None, :]) ** 2).sum(1))
            else:
                ext = (np.abs(m) * q[12:15][None, :]).sum(1)
            lo, hi = c - ext, c + ext
        if pad is not None:
            lo, hi = lo - sc * pad[i], hi + sc * pad[i]
        out[i] = [lo[0], hi[0], lo[1], hi[1], lo[2], hi[2]]
    return out


def _struct_boxes(pbox, sprims, sinfo) -> np.ndarray:
    out = np.empty((len(sinfo), 6))
    for s, (a, b) in enumerate(sinfo[:, :2].astype(int)):
        u = [r for r in range(a, b) if sprims[r, 2] == UNION and sprims[r, 0] != PLANE]
        bx = pbox[u]
        out[s] = [bx[:, 0].min(), bx[:, 1].max(), bx[:, 2].min(), bx[:, 3].max(), bx[:, 4].min(), bx[:, 5].max()]
    return out


@lru_cache(maxsize=4)
def _packed(seed: int):
    """The anatomy of a seed packed for the kernel (cached): flesh rows, structure rows, structure table."""
    anat = build_anatomy(seed)
    ids = name_to_id()
    fprims = np.zeros((len(anat.flesh), 4 + NPARAM))
    for i, fp in enumerate(anat.flesh):
        fprims[i, 0], fprims[i, 1], fprims[i, 3] = fp.prim.type, fp.seg, fp.girth_mm
        fprims[i, 4:4 + len(fp.prim.params)] = fp.prim.params
    rows, sinfo = [], []
    for si, st in enumerate(anat.structures):
        start = len(rows)
        for p in st.prims:
            r = np.zeros(4 + NPARAM)
            r[0], r[1], r[2], r[3] = p.type, st.seg, p.op, si
            r[4:4 + len(p.params)] = p.params
            rows.append(r)
        label = ids[st.name] if st.name else 0
        sinfo.append([start, len(rows), label, st.kind, st.hu, st.hu_inner, st.cortex_mm, st.tex_amp])
    return anat, fprims, np.asarray(rows), np.asarray(sinfo, dtype=np.float64)


# Skeleton variants: the largest rotation of a rest bone direction and the largest relative change of
# a rest bone length (a different body model's canonical skeleton, for retargeting checks).
VARIANT_MAX_DEG = 15.0
VARIANT_MAX_LENGTH = 0.10


@lru_cache(maxsize=8)
def skeleton_variant(joints_key: bytes, variant: int):
    """A variant of a rest skeleton: ``(joints (24, 3) mm, V (24, 4, 4))``. Each joint's segment is
    turned about the joint by its own rotation of up to ``VARIANT_MAX_DEG`` (a swing, normal to the
    bone, where the joint has one child; any axis at the pelvis and spine3) and scaled by up to
    ``VARIANT_MAX_LENGTH``; the variant joints are built down the tree so that segments stay joined,
    and ``V_j(x) = J'_j + s_j R_j (x - J_j)`` carries the segment's anatomy to the variant rest.
    Leaves (head, hands, feet) keep their frames. Seeded, deterministic."""
    j = np.frombuffer(joints_key, dtype=np.float64).reshape(24, 3)
    rng = np.random.default_rng([int(variant), 2113])
    kids = [[c for c in range(24) if PARENTS[c] == i] for i in range(24)]
    rot = np.tile(np.eye(3), (24, 1, 1))
    scale = np.ones(24)
    for i in range(24):
        if not kids[i]:
            continue
        ax = rng.normal(size=3)
        if len(kids[i]) == 1:
            b = j[kids[i][0]] - j[i]
            b = b / np.linalg.norm(b)
            ax = ax - (ax @ b) * b
        ax = ax / np.linalg.norm(ax)
        rot[i] = rodrigues(ax * np.deg2rad(rng.uniform(0.0, VARIANT_MAX_DEG)))
        scale[i] = 1.0 + rng.uniform(-VARIANT_MAX_LENGTH, VARIANT_MAX_LENGTH)
    jv = j.copy()
    for c in range(1, 24):
        p = PARENTS[c]
        jv[c] = jv[p] + scale[p] * rot[p] @ (j[c] - j[p])
    v = np.tile(np.eye(4), (24, 1, 1))
    for i in range(24):
        v[i, :3, :3] = scale[i] * rot[i]
        v[i, :3, 3] = jv[i] - scale[i] * rot[i] @ j[i]
    jv.setflags(write=False)
    v.setflags(write=False)
    return jv, v


def rest_skeleton(anat, variant=None):
    """``(rest joints (24, 3) mm, V (24, 4, 4) or None)`` of a seed's anatomy or its skeleton variant."""
    if variant is None:
        return anat.joints, None
    return skeleton_variant(np.ascontiguousarray(anat.joints, dtype=np.float64).tobytes(), int(variant))


# The variant's flesh rule: a flesh primitive centred within this distance of a joint between its
# segment and another is moved by a blend of the two segments' motions (rotation slerped about the
# joint, weight 0.5 at the joint falling to 0 here), as skinning weights shared across a joint do;
# the project's phantom moves every flesh primitive rigidly with its own segment.
VARIANT_FLESH_BLEND_MM = 60.0


def _flesh_blend_table(anat, fprims) -> list:
    """[(flesh row, joint, other segment, weight)] for the variant's flesh rule."""
    j = anat.joints
    kids = [[c for c in range(24) if PARENTS[c] == i] for i in range(24)]
    out = []
    for f, row in enumerate(fprims):
        t, seg, q = int(row[0]), int(row[1]), row[4:]
        if t == PLANE:
            continue
        c = 0.5 * (q[0:3] + q[3:6]) if t == CONE else (q[0:9].reshape(3, 3).mean(0) if t == TRI else q[0:3])
        cands = ([(seg, int(PARENTS[seg]))] if seg > 0 else []) + [(k, k) for k in kids[seg]]
        best = None
        for joint, other in cands:
            d = float(np.linalg.norm(c - j[joint]))
            if d < VARIANT_FLESH_BLEND_MM and (best is None or d < best[0]):
                best = (d, joint, other)
        if best is not None:
            out.append((f, best[1], best[2], 0.5 * (1.0 - best[0] / VARIANT_FLESH_BLEND_MM)))
    return out


def _posed_rows(anat, fprims, pose, transl, variant=None):
    """``(T, T_all, flesh rows)``: the segment transforms (24, 4, 4) that place the structures, and
    the flesh's, ``T`` with the variant's blended flesh transforms appended (the returned flesh rows
    point at them); without a variant ``T_all`` is ``T`` and the rows are unchanged."""
    T = _segment_transforms(anat, pose, transl, variant)
    if variant is None:
        return T, T, fprims

    rest, v = rest_skeleton(anat, variant)
    a, _ = forward_kinematics(pose, rest)
    fp = fprims.copy()
    extra = []
    for f, joint, other, w in _flesh_blend_table(anat, fprims):
        seg = int(fprims[f, 1])
        x = rest[joint]
        pj = a[seg, :3, :3] @ x + a[seg, :3, 3]
        b = np.eye(4)
        b[:3, :3] = _slerp_matrices(a[seg, :3, :3], a[other, :3, :3], w)
        b[:3, 3] = pj - b[:3, :3] @ x
        m = b @ v[seg]
        m[:3, 3] += transl
        fp[f, 1] = 24 + len(extra)
        extra.append(m)
    t_all = np.concatenate([T, np.asarray(extra).reshape(-1, 4, 4)]) if extra else T
    return T, t_all, fp


def _segment_transforms(anat, pose, transl, variant=None) -> np.ndarray:
    rest, v = rest_skeleton(anat, variant)
    a, _ = forward_kinematics(pose, rest)
    t = a.copy() if v is None else a @ v
    t[:, :3, 3] += transl
    return t


def _table_box(seed: int, variant=None) -> np.ndarray:
    """The table (world, static): under the back of the supine patient of this seed."""
    anat, fprims = _packed(seed)[:2]
    trunk = {0, 3, 6, 9}
    zlo, zhi, top = np.inf, -np.inf, -np.inf
    for name in ACQUISITION_PRESETS:
        _, T, fp = _posed_rows(anat, fprims, PRESETS[name], np.zeros(3), variant)
        wb = _prim_world_boxes(fp, T, pad=np.maximum(fprims[:, 3], 0.0))
        zlo, zhi = min(zlo, wb[:, 4].min()), max(zhi, wb[:, 5].max())
        if name == ACQUISITION_PRESETS[0]:
            top = max(wb[i, 3] for i in range(len(wb)) if int(fprims[i, 1]) in trunk)
    hw = TABLE_HALF_WIDTH * anat.shape.scale
    return np.array([-hw, hw, top, top + TABLE_THICKNESS, zlo - 40.0, zhi + 40.0, TABLE_SHELL])


def _as_pose(pose):
    if isinstance(pose, str) and pose not in PRESETS and not (pose.endswith((".json", ".npz")) or Path(pose).exists()):
        raise CtwinError(f"unknown pose '{pose}': give a pose file or one of {', '.join(PRESETS)}")
    r = resolve_pose(pose)
    if r["pose"] is None or r.get("relative"):
        raise CtwinError("the phantom takes an absolute pose ('pose', 72 floats): not world joints "
                         "alone, nor a relative pose")
    return r["pose"], r["transl"], r.get("rest_joints")


def generate_phantom(pose="supine_arms_down", spacing: float = 3.0, seed: int = 0, noise_hu: float = 0.0,
                     transl=None, subsamples: int = 2, roi_mm=None, skeleton_variant=None) -> Phantom:
    """Voxelise the phantom at a pose (preset name, pose file, dict or 72 floats).

    ``transl`` (mm) overrides the pose file's; presets use 0. ``subsamples`` per axis at boundary voxels.
    ``roi_mm`` = (lo (3,), hi (3,)) world box: voxelise only that part of the grid (same lattice).
    ``skeleton_variant`` (int seed): the anatomy on a variant rest skeleton (``skeleton_variant``):
    bone directions and lengths differ as another body model's would. A pose file with
    ``rest_joints`` is retargeted onto the phantom's rest skeleton (``core.rig.retarget``).
    """
    spacing = float(spacing)
    if not (0.5 <= spacing <= 20.0):
        raise CtwinError(f"spacing must be between 0.5 and 20 mm, got {spacing}")
    if noise_hu < 0:
        raise CtwinError("noise must be >= 0 HU")
    seed = int(seed)
    if seed < 0:
        raise CtwinError("seed must be >= 0")
    if skeleton_variant is not None and int(skeleton_variant) < 0:
        raise CtwinError("the skeleton variant must be >= 0")
    pose_v, transl_file, src_rest = _as_pose(pose)
    tr = np.zeros(3) if transl is None else np.asarray(transl, dtype=np.float64).reshape(3)
    if transl is None and transl_file is not None:
        tr = transl_file
    anat, fprims, sprims, sinfo = _packed(seed)
    rest_j, _ = rest_skeleton(anat, skeleton_variant)
    if src_rest is not None:
        pose_v = np.asarray(retarget_pose(pose_v, src_rest, rest_j), dtype=np.float64)
    T, t_all, fprims = _posed_rows(anat, fprims, pose_v, tr, skeleton_variant)
    seg_inv = np.ascontiguousarray(np.linalg.inv(t_all)[:, :3, :])
    fbox = _prim_world_boxes(fprims, t_all, pad=np.maximum(fprims[:, 3], 0.0))
    pbox = _prim_world_boxes(sprims, T)
    sbox = _struct_boxes(pbox, sprims, sinfo)
    table = _table_box(seed, skeleton_variant)
    lo = np.minimum(fbox[:, [0, 2, 4]].min(0), table[[0, 2, 4]]) - 12.0
    hi = np.maximum(fbox[:, [1, 3, 5]].max(0), table[[1, 3, 5]]) + 12.0
    if roi_mm is not None:
        rlo, rhi = (np.asarray(v, dtype=np.float64).reshape(3) for v in roi_mm)
        lo, hi = np.maximum(lo, rlo), np.minimum(hi, rhi)
        if np.any(hi <= lo):
            raise CtwinError("the region of interest does not overlap the phantom")
    lo = np.floor(lo / spacing) * spacing
    n = np.ceil((hi - lo) / spacing).astype(int) + 1
    if np.prod(n) * 6 > 3e9:
        raise CtwinError(f"grid {tuple(n)} at {spacing} mm is too large")
    report(f"phantom: seed {seed}, grid {n[0]}x{n[1]}x{n[2]} at {spacing:g} mm", 0.05)
    ids = name_to_id()
    hu = np.empty(tuple(n), dtype=np.int16)
    lab = np.empty(tuple(n), dtype=np.uint16)
    _voxelise(int(n[0]), int(n[1]), int(n[2]), float(lo[0]), float(lo[1]), float(lo[2]), spacing, seg_inv,
              fprims, fbox, sprims, pbox, sinfo, sbox, table, anat.skin_mm, anat.fat_mm, anat.blend_mm, seed,
              int(subsamples), ids["skin"], ids["subcutaneous_fat"], ids["muscle"], ids["table"], hu, lab)
    report("phantom: voxelised", 0.85)
    if noise_hu > 0:  # seeded Gaussian noise, slab by slab to keep memory flat
        rng = np.random.default_rng([seed, 11])
        for k in range(hu.shape[2]):
            sl = hu[:, :, k].astype(np.float32) + rng.standard_normal(hu.shape[:2], dtype=np.float32) * np.float32(noise_hu)
            hu[:, :, k] = np.clip(np.rint(sl), -1024, 3071)
    ct_data = hu
    affine = affine_from([spacing] * 3, lo)
    ct = Volume(ct_data, affine, {"source": "ctwin phantom"})
    seg = Volume(lab, affine.copy(), {"source": "ctwin phantom"})
    counts = np.zeros(65536, np.int64)
    for k in range(lab.shape[2]):  # slab by slab: no int64 copy of the whole label volume
        counts += np.bincount(lab[:, :, k].ravel(), minlength=65536)
    present = np.flatnonzero(counts)
    names = {int(i): _id_name(i) for i in present if int(i) != 0}
    joints_w = forward_kinematics(pose_v, rest_j)[1] + tr
    bones, segments = {}, {}
    for si, st in enumerate(anat.structures):
        if st.name and is_skeletal(st.name) and ids[st.name] in names:
            bones[st.name] = T[st.seg].tolist()
            segments[st.name] = JOINT_NAMES[st.seg]
    truth = {
        "pose": pose_v.tolist(), "transl": tr.tolist(), "joints": joints_w.tolist(), "bones": bones,
        "bone_segments": segments, "joints_rest": np.asarray(rest_j).tolist(), "joint_names": list(JOINT_NAMES),
        "rest_joints": (np.asarray(rest_j) - np.asarray(rest_j)[0]).tolist(), "kintree_parents": PARENTS.tolist(),
        "skeleton_variant": None if skeleton_variant is None else int(skeleton_variant),
        "seed": seed, "shape": anat.shape.to_json(), "spacing_mm": spacing, "noise_hu": float(noise_hu),
        "table_box_mm": table[:6].tolist(), "subsamples": int(subsamples),
    }
    return Phantom(ct, seg, names, truth)


def body_sdf(points, pose="supine_arms_down", seed: int = 0, transl=None, skeleton_variant=None) -> np.ndarray:
    """Signed distance (mm, < 0 inside) of world points to the phantom's skin surface at a pose.

    The same blended outline the voxeliser uses (without brick culling): the ground truth for
    "inside the body" checks.
    """
    pose_v, transl_file, src_rest = _as_pose(pose)
    tr = np.zeros(3) if transl is None else np.asarray(transl, dtype=np.float64).reshape(3)
    if transl is None and transl_file is not None:
        tr = transl_file
    anat, fprims = _packed(int(seed))[:2]
    if src_rest is not None:
        pose_v = np.asarray(retarget_pose(pose_v, src_rest, rest_skeleton(anat, skeleton_variant)[0]))
    _, t_all, fprims = _posed_rows(anat, fprims, pose_v, tr, skeleton_variant)
    seg_inv = np.ascontiguousarray(np.linalg.inv(t_all)[:, :3, :])
    pts = np.ascontiguousarray(np.asarray(points, dtype=np.float64).reshape(-1, 3))
    out = np.empty(len(pts))
    _body_sdf_points(pts, seg_inv, fprims, anat.blend_mm, out)
    return out


def _id_name(i) -> str:
    return all_names()[int(i)]


def write_phantom(out_dir, **kwargs) -> Phantom:
    """Generate and write ct.nii.gz, seg.nii.gz, labels.json and truth.json into ``out_dir``."""
    out = Path(out_dir)
    ph = generate_phantom(**kwargs)
    out.mkdir(parents=True, exist_ok=True)
    save_nifti(ph.ct, out / "ct.nii.gz")
    save_nifti(ph.seg, out / "seg.nii.gz")
    write_json(out / "labels.json", {str(k): v for k, v in sorted(ph.labels.items())})
    write_json(out / "truth.json", ph.truth)
    report(f"phantom written to {out}", 1.0)
    return ph
