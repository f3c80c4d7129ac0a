"""The phantom's anatomy: bones, organs and body outline as signed-distance primitives.

Everything is defined in SMPL's canonical rest frame (T pose, mm, x left, y up, z front), with the
pelvis joint at the origin. Each structure (one label) is attached to ONE segment (an SMPL joint)
and moves rigidly with it; the body outline ("flesh") is a set of per-segment primitives that the
voxeliser blends with a smooth minimum, so soft tissue follows the limbs without tearing.

Joint centres are anatomical (femoral head centre, knee between the condyles, talus, glenohumeral
centre, elbow between the epicondyles, vertebral boundaries along the spine curve); they are not
taken from any body model.

Primitive types (``params`` in the rest frame):
  CONE  round cone: a(3), b(3), ra, rb
  ELL   ellipsoid: c(3), R(9, rest->local rows), radii(3)
  TRI   triangle slab: a(3), b(3), c(3), half-thickness
  BOX   rounded box: c(3), R(9), half(3), rounding
  PLANE half-space dot(n, q) <= c: n(3), c   (only as an intersect operand)
A structure is the union of its ``op=UNION`` primitives, minus its ``SUB`` ones, intersected with its
``INT`` ones. The seed's body shape scales each segment about its joint (height, leg and arm
length) and offsets the flesh outward (girth).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..volumes.labels import name_to_id
from ..body.skeleton import JOINT_INDEX, JOINT_NAMES, PARENTS, canonical_joints_mm

CONE, ELL, TRI, BOX, PLANE = 0, 1, 2, 3, 4
UNION, SUB, INT = 0, 1, 2
KIND_BONE, KIND_SOFT = 0, 1
NPARAM = 20


@dataclass
class Prim:
    type: int
    params: list
    op: int = UNION


@dataclass
class Structure:
    name: str          # label name ("" for an unlabelled region)
    seg: int           # SMPL joint index the structure is attached to
    kind: int          # KIND_BONE (cortical shell + cancellous core) or KIND_SOFT
    hu: float          # soft: HU; bone: cortical HU
    hu_inner: float = 0.0   # bone: cancellous HU
    cortex_mm: float = 0.0  # bone: cortical thickness
    tex_amp: float = 0.0    # texture amplitude (HU) of the inner tissue
    prims: list = field(default_factory=list)


@dataclass
class FleshPrim:
    seg: int
    prim: Prim
    girth_mm: float  # outward offset per unit of (girth - 1)


@dataclass
class Shape:
    """Body shape drawn from the seed (seed 0 = the default adult)."""
    scale: float = 1.0   # overall size (height 1.76 m at 1.0)
    leg: float = 1.0     # leg length ratio
    arm: float = 1.0     # arm length ratio
    girth: float = 1.0   # flesh thickness (fat); >= 1 so that bones keep their soft-tissue cover

    @classmethod
    def from_seed(cls, seed: int) -> "Shape":
        if int(seed) == 0:
            return cls()
        rng = np.random.default_rng([int(seed), 7])
        return cls(
            scale=float(np.clip(rng.normal(1.0, 0.05), 0.87, 1.11)),
            leg=float(np.clip(rng.normal(1.0, 0.03), 0.93, 1.07)),
            arm=float(np.clip(rng.normal(1.0, 0.03), 0.93, 1.07)),
            girth=float(np.clip(rng.normal(1.08, 0.12), 1.0, 1.4)),
        )

    def to_json(self) -> dict:
        return {"scale": self.scale, "leg": self.leg, "arm": self.arm, "girth": self.girth}


@dataclass
class Anatomy:
    joints: np.ndarray            # (24, 3) rest joint centres, mm, canonical frame
    structures: list              # list[Structure] in priority order (first wins)
    flesh: list                   # list[FleshPrim]
    shape: Shape
    skin_mm: float
    fat_mm: float
    blend_mm: float


# --------------------------------------------------------------------------------------------
# primitive helpers (default body, mm, y from the ground)

def _v(*a):
    return [float(x) for x in a]


def cone(a, b, ra, rb=None, op=UNION):
    rb = ra if rb is None else rb
    return Prim(CONE, _v(*a, *b, ra, rb), op)


def _rot_rows(axes):
    """Rows = local axes expressed in the rest frame."""
    r = np.asarray(axes, dtype=np.float64)
    return r.reshape(-1).tolist()


def ell(c, radii, rot=None, op=UNION):
    r = np.eye(3) if rot is None else np.asarray(rot, dtype=np.float64)
    return Prim(ELL, _v(*c) + _rot_rows(r) + _v(*radii), op)


def tri(a, b, c, r, op=UNION):
    return Prim(TRI, _v(*a, *b, *c, r), op)


def box(c, half, r, rot=None, op=UNION):
    rr = np.eye(3) if rot is None else np.asarray(rot, dtype=np.float64)
    return Prim(BOX, _v(*c) + _rot_rows(rr) + _v(*half, r), op)


def plane(n, p0):
    n = np.asarray(n, dtype=np.float64)
    n = n / np.linalg.norm(n)
    return Prim(PLANE, _v(*n, float(n @ np.asarray(p0, dtype=np.float64))), INT)


def rot_x(deg):
    t = np.deg2rad(deg)
    c, s = np.cos(t), np.sin(t)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def rot_z(deg):
    t = np.deg2rad(deg)
    c, s = np.cos(t), np.sin(t)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def _mirror_prim(p: Prim) -> Prim:
    """Mirror a primitive through the plane x = 0."""
    q = list(p.params)
    m = np.diag([-1.0, 1.0, 1.0])
    if p.type == CONE:
        q[0] = -q[0]
        q[3] = -q[3]
    elif p.type == TRI:
        q[0], q[3], q[6] = -q[0], -q[3], -q[6]
    elif p.type in (ELL, BOX):
        q[0] = -q[0]
        r = np.asarray(q[3:12]).reshape(3, 3)
        q[3:12] = (m @ r @ m).reshape(-1).tolist()
    elif p.type == PLANE:
        q[0] = -q[0]
    return Prim(p.type, q, p.op)


# --------------------------------------------------------------------------------------------
# default adult (seed 0), coordinates in mm with y measured from the ground

_SPINE = (  # name, segment height (body + disc), z of the body centre
    ("L5", 35, -35), ("L4", 35, -25), ("L3", 35, -20), ("L2", 35, -22), ("L1", 35, -30),
    ("T12", 29, -38), ("T11", 28.4, -45), ("T10", 27.8, -51), ("T9", 27.2, -56), ("T8", 26.6, -60),
    ("T7", 26, -62), ("T6", 25.4, -62), ("T5", 24.8, -60), ("T4", 24.2, -57), ("T3", 23.6, -52),
    ("T2", 23, -46), ("T1", 22.4, -40), ("C7", 18, -32), ("C6", 17, -25), ("C5", 16.5, -20),
    ("C4", 16, -17), ("C3", 16, -17), ("C2", 20, -19), ("C1", 14, -22),
)
_SACRUM_TOP = 1005.0


def _spine_layout():
    """Vertebra centres, tangents and the boundary points between consecutive vertebrae."""
    y = _SACRUM_TOP
    out = []
    for name, h, z in _SPINE:
        out.append({"name": name, "h": float(h), "c": np.array([0.0, y + h / 2.0, float(z)])})
        y += h
    for i, v in enumerate(out):
        prev_c = out[i - 1]["c"] if i > 0 else np.array([0.0, _SACRUM_TOP - 20.0, -42.0])
        next_c = out[i + 1]["c"] if i + 1 < len(out) else np.array([0.0, y + 10.0, -20.0])
        t = next_c - prev_c
        v["t"] = t / np.linalg.norm(t)
    bounds = {}
    for i in range(len(out) - 1):
        lo, hi = out[i], out[i + 1]
        bounds[(lo["name"], hi["name"])] = np.array([0.0, lo["c"][1] + lo["h"] / 2.0,
                                                     0.5 * (lo["c"][2] + hi["c"][2])])
    return out, bounds


def _default_joints() -> np.ndarray:
    """The default adult's joint centres: the project's canonical rest skeleton (shared with the
    built-in body model, ``core.body.skeleton.canonical_joints_mm``: femoral head centres, the knee
    between the condyles, the spine joints on the discs of ``_spine_layout``, ...)."""
    return canonical_joints_mm()


def _vertebra_segment(name: str) -> int:
    if name in ("L4", "L5"):
        return JOINT_INDEX["pelvis"]
    if name in ("L1", "L2", "L3"):
        return JOINT_INDEX["spine1"]
    if name[0] == "T" and int(name[1:]) >= 7:
        return JOINT_INDEX["spine2"]
    if name[0] == "T":
        return JOINT_INDEX["spine3"]
    return JOINT_INDEX["neck"]


def _lerp(a, b, t):
    return a + (b - a) * t


def _vertebra(v) -> list:
    """Body, arch, spinous and transverse processes of one vertebra (rest frame)."""
    name = v["name"]
    c, t = v["c"], v["t"]
    ex = np.array([1.0, 0.0, 0.0])
    ey = t
    ez = np.cross(ex, ey)
    ez /= np.linalg.norm(ez)
    ex = np.cross(ey, ez)
    rows = np.stack([ex, ey, ez])  # rest -> local

    def w(p):  # local -> rest
        return c + rows.T @ np.asarray(p, dtype=np.float64)

    region = name[0]
    idx = int(name[1:])
    if region == "L":
        s = (5 - idx) / 4.0  # L5 -> 0, L1 -> 1
        bw, bd = _lerp(25.0, 22.0, s), _lerp(18.0, 16.5, s)
        canal, sp_len, sp_drop, tp, arch_r, sp_r = 16.0, 26.0, 6.0, 45.0, 4.5, 5.0
    elif region == "T":
        s = (idx - 1) / 11.0  # T1 -> 0, T12 -> 1
        bw, bd = _lerp(14.0, 21.0, s), _lerp(10.5, 16.0, s)
        canal, sp_len, sp_drop, tp, arch_r, sp_r = 14.0, _lerp(24.0, 26.0, s), 18.0, _lerp(36.0, 30.0, s), 3.8, 4.0
    else:
        bw, bd = (10.5, 8.0) if idx > 2 else (10.0, 8.0)
        canal, sp_len, sp_drop, tp, arch_r, sp_r = 13.0, (19.0 if idx == 7 else 14.0), 6.0, 24.0, 3.2, 3.5
    bh = max((v["h"] - (8.0 if region == "L" else 5.5 if region == "T" else 4.5)) / 2.0, 4.0)
    prims = []
    if name == "C1":  # the atlas: a ring, no body
        prims.append(cone(w((-bw, 0, 0)), w((bw, 0, 0)), 5.0))
        prims.append(cone(w((-bw, 0, 0)), w((0, 0, -bd - canal - 2)), 3.5))
        prims.append(cone(w((bw, 0, 0)), w((0, 0, -bd - canal - 2)), 3.5))
        prims.append(cone(w((-bw - 2, 0, -4)), w((-bw - 14, 0, -6)), 3.5))
        prims.append(cone(w((bw + 2, 0, -4)), w((bw + 14, 0, -6)), 3.5))
        return prims
    prims.append(box(c, (bw, bh, bd), min(bw, bd) * 0.5, rot=rows))
    if name == "C2":  # dens
        prims.append(cone(w((0, bh, 2)), w((0, bh + 14, 2)), 4.5))
    lam = w((0, -2, -bd - canal - 3))
    prims.append(cone(w((-0.55 * bw, 0, -bd + 3)), lam, arch_r))
    prims.append(cone(w((0.55 * bw, 0, -bd + 3)), lam, arch_r))
    prims.append(cone(lam, w((0, -sp_drop, -bd - canal - 3 - sp_len)), sp_r, sp_r * 0.8))
    prims.append(cone(w((-0.6 * bw, 0, -bd - 6)), w((-tp, 2, -bd - 12)), arch_r))
    prims.append(cone(w((0.6 * bw, 0, -bd - 6)), w((tp, 2, -bd - 12)), arch_r))
    return prims


# rib tables (k = 1..12)
_RIB_A = (62, 88, 106, 118, 127, 133, 136, 137, 135, 130, 122, 110)
_RIB_FRONT = (68, 80, 88, 93, 96, 98, 98, 96, 92, 86, 76, 60)
_RIB_END = (2.55, 2.5, 2.42, 2.36, 2.32, 2.3, 2.28, 2.15, 2.0, 1.85, 1.55, 1.2)
_RIB_DROP = (38, 48, 58, 64, 68, 70, 68, 64, 58, 52, 42, 32)


def _rib(k, vert, side):
    """Rib k (1..12) on one side (+1 left, -1 right): bony part and its costal cartilage end."""
    c = vert["c"]
    bw = _lerp(14.0, 21.0, (k - 1) / 11.0)
    a, zf, th1, drop = _RIB_A[k - 1], _RIB_FRONT[k - 1], _RIB_END[k - 1], _RIB_DROP[k - 1]
    zb = c[2] - 28.0
    zc, b = 0.5 * (zf + zb), 0.5 * (zf - zb)
    ths = np.linspace(0.32, th1, 8)
    pts = [np.array([side * (bw + 4.0), c[1] + 2.0, c[2] - 6.0])]
    for th in ths:
        f = ((th - ths[0]) / (th1 - ths[0])) ** 1.3
        pts.append(np.array([side * a * np.sin(th), c[1] - drop * f, zc - b * np.cos(th)]))
    r = 4.8 if k > 1 else 5.5
    prims = [cone(pts[i], pts[i + 1], r) for i in range(len(pts) - 1)]
    return prims, pts[-1]


def _build_default(joints, spine, bounds):
    J = {n: joints[i] for i, n in enumerate(JOINT_NAMES)}
    seg = JOINT_INDEX
    S = []  # structures in priority order (bones first)
    verts = {v["name"]: v for v in spine}

    def bone(name, sg, prims, cortical=1450.0, inner=260.0, cortex=2.5, tex=55.0):
        S.append(Structure(name, seg[sg] if isinstance(sg, str) else sg, KIND_BONE, cortical, inner,
                           cortex, tex, prims))

    def soft(name, sg, prims, hu, tex=0.0):
        S.append(Structure(name, seg[sg] if isinstance(sg, str) else sg, KIND_SOFT, hu, 0.0, 0.0, tex,
                           prims))

    def sym_bone(base, sg, prims_left, **kw):
        bone(base + "_left", "left_" + sg, prims_left, **kw)
        bone(base + "_right", "right_" + sg, [_mirror_prim(p) for p in prims_left], **kw)

    # ---- skull (head): cranium shell, maxilla, mandible
    cc, cr = (0.0, 1680.0, -10.0), np.array([70.0, 72.0, 92.0])
    skull = [ell(cc, cr), ell(cc, cr - 6.5, op=SUB),
             ell((0, 1622, 52), (36, 24, 26)), ell((0, 1622, 52), (31, 19, 21), op=SUB),
             cone((0, 1572, 74), (44, 1586, 18), 6.0), cone((0, 1572, 74), (-44, 1586, 18), 6.0),
             cone((44, 1586, 18), (52, 1628, 4), 5.5), cone((-44, 1586, 18), (-52, 1628, 4), 5.5)]
    bone("skull", "head", skull, cortex=2.2, inner=500.0, tex=60.0)

    # ---- vertebrae
    for v in spine:
        bone("vertebrae_" + v["name"], _vertebra_segment(v["name"]), _vertebra(v), cortex=1.8, inner=230.0)
    # ---- sacrum + coccyx (pelvis)
    sac = [tri((-48, 1000, -40), (48, 1000, -40), (0, 905, -88), 9.0),
           cone((0, 1000, -38), (0, 905, -88), 11.0), cone((0, 905, -88), (0, 872, -92), 5.0)]
    bone("sacrum", "pelvis", sac, cortex=1.8, inner=220.0)

    # ---- hip bones (pelvis)
    hip = [tri((120, 1005, 52), (128, 1035, -8), (92, 930, 8), 4.5),
           tri((128, 1035, -8), (48, 1010, -62), (92, 930, 8), 4.5),
           tri((48, 1010, -62), (52, 978, -55), (92, 930, 8), 5.5),
           cone((120, 1005, 52), (128, 1035, -8), 6.0), cone((128, 1035, -8), (48, 1010, -62), 6.0),
           ell((78, 914, 5), (28, 28, 28)),                                   # acetabulum roof
           cone((76, 888, 30), (9, 872, 62), 8.0),                            # superior pubic ramus
           cone((9, 858, 58), (58, 826, -28), 7.0),                           # inferior ramus
           cone((84, 880, -22), (62, 826, -30), 11.0),                        # ischium
           ell((88, 905, 5), (26.5, 26.5, 26.5), op=SUB)]                     # socket
    bone("hip_left", "pelvis", hip, cortex=2.2, inner=240.0)
    bone("hip_right", "pelvis", [_mirror_prim(p) for p in hip], cortex=2.2, inner=240.0)

    # ---- ribs, costal cartilages, sternum
    cart = []
    att = {}
    for k in range(1, 13):
        v = verts[f"T{k}"]
        for side, sname in ((1, "left"), (-1, "right")):
            prims, end = _rib(k, v, side)
            bone(f"rib_{sname}_{k}", _vertebra_segment(f"T{k}"), prims, cortex=1.6, inner=280.0)
            att[(k, side)] = end
    st_top = att[(1, 1)][1] + 8.0
    ys = [att[(k, 1)][1] - (6.0 if k < 6 else -4.0 * (k - 5)) for k in range(1, 8)]
    for k in range(1, 11):
        for side in (1, -1):
            e = np.asarray(att[(k, side)])
            if k <= 7:
                tgt = np.array([side * (21.0 if k == 1 else 15.0), ys[k - 1] - 4.0, 86.0 + 2.0 * k])
                cart.append(cone(e, tgt, 4.5))
            else:  # false ribs join the cartilage above (costal margin)
                tgt = np.array([side * (22.0 + 28.0 * (k - 7)), ys[6] - 12.0 - 6.0 * (k - 7), 92.0 - 6.0 * (k - 7)])
                cart.append(cone(e, tgt, 4.0))
    bone("costal_cartilages", "spine3", cart, cortical=180.0, inner=160.0, cortex=1.0, tex=15.0)
    st_bot = ys[6] - 8.0
    sternum = [box((0, st_top - 22.0, 80), (25, 22, 6), 5.0, rot=rot_x(-8)),
               box((0, 0.5 * (st_top - 46 + st_bot), 91), (15, 0.5 * (st_top - 46 - st_bot), 6), 5.0, rot=rot_x(-10)),
               cone((0, st_bot, 98), (0, st_bot - 32, 100), 5.0, 3.5)]
    bone("sternum", "spine3", sternum, cortex=1.8, inner=250.0)

    # ---- shoulder girdle (collar): clavicle, scapula
    clav = [cone((25, 1442, 70), (70, 1450, 66), 7.0, 6.0), cone((70, 1450, 66), (120, 1455, 42), 6.0),
            cone((120, 1455, 42), (176, 1461, -20), 6.0, 7.0)]
    sym_bone("clavicula", "collar", clav, cortex=2.5, inner=280.0)
    scap = [tri((150, 1425, -45), (85, 1458, -88), (96, 1302, -100), 3.6),
            cone((150, 1425, -45), (96, 1302, -100), 5.0),
            cone((150, 1412, -38), (150, 1440, -40), 7.0),                       # glenoid rim
            cone((88, 1440, -96), (182, 1462, -44), 5.0),                        # scapular spine
            ell((190, 1462, -28), (17, 5.5, 14)),                                # acromion
            cone((150, 1433, -32), (150, 1436, 2), 5.0)]                         # coracoid
    sym_bone("scapula", "collar", scap, cortex=2.0, inner=280.0)

    # ---- arm: humerus (shoulder), radius + ulna (elbow), hand (wrist, hand)
    hum = [ell(J["left_shoulder"], (22, 22, 22)),
           cone((196, 1425, -30), (470, 1425, -30), 14.0, 10.5),
           cone((470, 1425, -30), (496, 1425, -31), 10.5, 13.0),
           cone((498, 1399, -32), (498, 1451, -32), 9.0),
           ell((500, 1425, -30), (12, 22, 14))]
    sym_bone("humerus", "shoulder", hum, cortex=4.0, inner=220.0)
    rad = [ell((523, 1425, -14), (8, 10, 10)), cone((523, 1425, -14), (740, 1425, -13), 7.0, 8.0),
           cone((740, 1425, -13), (756, 1425, -12), 8.0, 12.0)]
    sym_bone("radius", "elbow", rad, cortex=3.0, inner=230.0)
    uln = [ell((490, 1425, -58), (10, 10, 8)), cone((490, 1425, -58), (527, 1425, -42), 7.0, 9.0),
           cone((527, 1425, -42), (752, 1428, -41), 9.0, 6.0), ell((758, 1428, -41), (8, 8, 8))]
    sym_bone("ulna", "elbow", uln, cortex=3.0, inner=230.0)
    sym_bone("carpal", "wrist", [box((790, 1425, -25), (14, 8, 22), 5.0)], cortex=1.5, inner=300.0)
    fz = (-50.0, -34.0, -18.0, -2.0)
    mc = [cone((808, 1425, z), (860, 1425, z), 4.5) for z in fz]
    mc.append(cone((804, 1420, 5), (834, 1418, 28), 5.0))
    sym_bone("metacarpal", "wrist", mc, cortex=1.8, inner=300.0)
    ph = []
    for z in fz:
        x = 872.0
        for ln, r in ((36.0, 4.5), (22.0, 4.0), (16.0, 3.6)):
            ph.append(cone((x, 1425, z), (x + ln, 1425, z), r))
            x += ln + 3.0
    ph.append(cone((841, 1417, 33), (866, 1416, 48), 4.5))
    ph.append(cone((869, 1416, 50), (888, 1415, 62), 4.0))
    sym_bone("phalanges_hand", "hand", ph, cortex=1.5, inner=320.0)

    # ---- leg: femur (hip), tibia/fibula/patella (knee), foot (ankle, foot)
    fem = [ell(J["left_hip"], (23, 23, 23)), cone((88, 905, 5), (126, 870, 0), 15.0, 14.0),
           ell((136, 878, -10), (14, 22, 18)), cone((128, 860, 0), (100, 560, 0), 14.0, 13.0),
           cone((100, 560, 0), (96, 518, -2), 13.0, 22.0),
           ell((73, 500, -7), (15, 22, 25)), ell((117, 500, -7), (15, 22, 25))]
    sym_bone("femur", "hip", fem, cortex=5.0, inner=220.0)
    tib = [box((95, 463, -3), (36, 10, 26), 8.0), cone((95, 455, -5), (93, 380, -2), 22.0, 13.0),
           cone((93, 380, -2), (93, 115, 0), 13.0, 11.0), ell((93, 98, 0), (22, 16, 20)),
           cone((72, 100, 0), (70, 64, 0), 6.0)]
    sym_bone("tibia", "knee", tib, cortex=5.0, inner=220.0)
    fib = [ell((126, 440, -22), (9, 9, 9)), cone((126, 440, -22), (123, 110, -15), 6.0),
           cone((123, 110, -15), (123, 55, -12), 6.0, 8.0)]
    sym_bone("fibula", "knee", fib, cortex=3.0, inner=230.0)
    sym_bone("patella", "knee", [ell((95, 535, 34), (20, 22, 9))], cortex=2.0, inner=280.0)
    tars = [ell((95, 62, -5), (15, 13, 24)), ell((97, 32, -45), (20, 22, 36)),
            box((97, 38, 32), (24, 14, 16), 6.0)]
    sym_bone("tarsal", "ankle", tars, cortex=1.8, inner=260.0)
    toes_x = (71.0, 84.0, 96.0, 108.0, 119.0)
    mt = [cone((x, 36, 52), (x, 18, 118), 7.0 if i == 0 else 5.0, 6.0 if i == 0 else 4.5)
          for i, x in enumerate(toes_x)]
    sym_bone("metatarsal", "ankle", mt, cortex=1.8, inner=280.0)
    pf = [cone((x, 16, 130), (x, 12, 168 - 4 * i), 6.0 if i == 0 else 4.5) for i, x in enumerate(toes_x)]
    sym_bone("phalanges_feet", "foot", pf, cortex=1.5, inner=300.0)

    # ---- airway, gas, organs (priority: gas > airways > heart > lungs > solid organs > bowel)
    soft("trachea", "spine3", [cone((0, 1560, 18), (0, 1372, -5), 9.0),
                               cone((0, 1372, -5), (45, 1335, -10), 6.5, 5.5),
                               cone((0, 1372, -5), (-42, 1340, -10), 7.0, 6.0),
                               cone((45, 1335, -10), (70, 1290, -14), 5.5, 3.5),
                               cone((-42, 1340, -10), (-68, 1292, -14), 6.0, 3.5)], -1000.0)
    soft("stomach", "spine2", [ell((50, 1222, 44), (26, 16, 20))], -1000.0)  # gastric air
    soft("heart", "spine3", [ell((22, 1272, 32), (62, 58, 50), rot=rot_z(-25))], 40.0, tex=4.0)
    lung_l = [ell((72, 1335, -6), (56, 128, 72)), ell((22, 1272, 32), (66, 62, 54), rot=rot_z(-25), op=SUB)]
    lung_r = [ell((-72, 1335, -6), (60, 128, 72))]
    n_obl = (0.0, 1.0, 1.0)
    p_obl = (0.0, 1335.0, -10.0)
    soft("lung_upper_lobe_left", "spine3", lung_l + [plane(np.negative(n_obl), p_obl)], -850.0, tex=35.0)
    soft("lung_lower_lobe_left", "spine3", lung_l + [plane(n_obl, p_obl)], -850.0, tex=35.0)
    soft("lung_upper_lobe_right", "spine3", lung_r + [plane(np.negative(n_obl), p_obl),
                                                      plane((0, -1, 0), (0, 1332, 0))], -850.0, tex=35.0)
    soft("lung_middle_lobe_right", "spine3", lung_r + [plane(np.negative(n_obl), p_obl),
                                                       plane((0, 1, 0), (0, 1332, 0))], -850.0, tex=35.0)
    soft("lung_lower_lobe_right", "spine3", lung_r + [plane(n_obl, p_obl)], -850.0, tex=35.0)
    soft("liver", "spine2", [ell((-52, 1192, 8), (82, 68, 80), rot=rot_z(12))], 60.0, tex=4.0)
    soft("gallbladder", "spine2", [ell((-40, 1148, 58), (14, 24, 14))], 10.0)
    soft("spleen", "spine2", [ell((98, 1205, -42), (26, 50, 30), rot=rot_z(-20))], 50.0, tex=4.0)
    soft("stomach", "spine2", [ell((52, 1205, 24), (44, 48, 36), rot=rot_z(-30))], 20.0, tex=6.0)
    soft("kidney_left", "spine1", [ell((62, 1142, -52), (27, 55, 22), rot=rot_z(-12))], 35.0, tex=4.0)
    soft("kidney_right", "spine1", [ell((-62, 1128, -52), (27, 55, 22), rot=rot_z(12))], 35.0, tex=4.0)
    soft("urinary_bladder", "pelvis", [ell((0, 922, 50), (38, 30, 32))], 8.0)
    colon = [cone((-106, 955, 15), (-110, 1150, 22), 22.0), cone((-110, 1150, 28), (0, 1112, 62), 20.0),
             cone((0, 1112, 62), (108, 1162, 36), 20.0), cone((108, 1162, 10), (104, 960, 2), 19.0),
             cone((104, 960, 2), (30, 935, -30), 16.0)]
    colon_gas = [ell((-60, 1128, 58), (14, 10, 9)), ell((55, 1140, 54), (15, 10, 9)),
                 ell((108, 1150, 28), (11, 11, 9)), ell((-108, 1020, 30), (12, 12, 8))]
    S.append(Structure("bowel_gas", seg["spine1"], KIND_SOFT, -1000.0, prims=list(colon_gas)))
    soft("colon", "spine1", colon, 10.0, tex=8.0)
    soft("small_bowel", "spine1", [ell((0, 1035, 42), (96, 68, 52))], 25.0, tex=10.0)
    soft("brain", "head", [ell(cc, cr - 7.5)], 35.0, tex=3.0)
    # unlabelled regions: mesenteric / retroperitoneal fat
    soft("", "spine1", [ell((0, 1085, 15), (122, 135, 80))], -90.0, tex=8.0)
    return S


def _default_flesh(J):
    seg = JOINT_INDEX
    F = []

    def f(sg, prim, girth, mirror=False):
        if mirror:
            left, right = ("left_" + sg, "right_" + sg) if "left_" + sg in seg else (sg, sg)
            F.append(FleshPrim(seg[left], prim, girth))
            F.append(FleshPrim(seg[right], _mirror_prim(prim), girth))
        else:
            F.append(FleshPrim(seg[sg], prim, girth))

    # trunk
    f("pelvis", box((0, 940, -8), (172, 120, 118), 75.0), 90.0)
    f("pelvis", ell((70, 880, -50), (82, 95, 80)), 40.0, True)
    f("spine1", box((0, 1075, -5), (150, 80, 112), 75.0), 110.0)
    f("spine2", box((0, 1240, -8), (155, 130, 118), 70.0), 100.0)
    f("spine3", box((0, 1330, -10), (158, 165, 122), 65.0), 90.0)
    f("neck", cone((0, 1470, -20), (0, 1612, -12), 62.0, 55.0), 35.0)
    f("spine3", ell((0, 1470, -55), (70, 45, 45)), 30.0)
    f("head", ell((0, 1675, -6), (78, 88, 104)), 6.0)
    f("head", ell((0, 1612, 38), (58, 55, 62)), 8.0)
    f("head", ell((0, 1590, 35), (68, 42, 58)), 8.0)
    # shoulder girdle
    f("collar", cone((30, 1445, -10), (185, 1430, -28), 55.0, 52.0), 25.0, True)
    f("collar", ell((110, 1370, -75), (68, 125, 45)), 25.0, True)
    f("collar", cone((25, 1445, 60), (120, 1455, 42), 22.0), 8.0, True)
    f("collar", cone((120, 1455, 42), (176, 1461, -20), 22.0), 8.0, True)
    # arm
    f("shoulder", cone(J["left_shoulder"], J["left_elbow"], 50.0, 38.0), 30.0, True)
    f("shoulder", ell(J["left_elbow"], (45, 50, 45)), 15.0, True)
    f("elbow", cone(J["left_elbow"], (765, 1425, -27), 42.0, 28.0), 18.0, True)
    f("elbow", ell((765, 1425, -27), (30, 26, 42)), 6.0, True)
    f("wrist", box((818, 1425, -22), (52, 15, 44), 12.0), 3.0, True)
    f("wrist", cone((804, 1420, 5), (838, 1418, 30), 13.0), 2.0, True)
    f("hand", box((915, 1425, -26), (50, 13, 40), 10.0), 2.0, True)
    f("hand", cone((838, 1418, 32), (890, 1415, 62), 12.0, 10.0), 2.0, True)
    # leg
    f("hip", cone(J["left_hip"], J["left_knee"], 80.0, 55.0), 45.0, True)
    f("knee", cone(J["left_knee"], J["left_ankle"], 59.0, 41.0), 25.0, True)
    f("knee", ell((95, 530, 25), (45, 45, 35)), 6.0, True)
    f("knee", ell((95, 370, -30), (48, 110, 48)), 20.0, True)
    f("knee", ell((97, 72, -8), (52, 46, 46)), 4.0, True)
    f("ankle", box((97, 40, 20), (42, 40, 110), 28.0), 3.0, True)
    f("foot", box((97, 18, 150), (40, 18, 32), 12.0), 2.0, True)
    return F


# --------------------------------------------------------------------------------------------
# shaping: each segment scales about its own joint; joints follow the kinematic chain

def _segment_scales(shape: Shape) -> np.ndarray:
    s = np.full(24, shape.scale)
    for n in ("hip", "knee", "ankle", "foot"):
        s[JOINT_INDEX["left_" + n]] = s[JOINT_INDEX["right_" + n]] = shape.scale * shape.leg
    for n in ("shoulder", "elbow", "wrist", "hand"):
        s[JOINT_INDEX["left_" + n]] = s[JOINT_INDEX["right_" + n]] = shape.scale * shape.arm
    return s


def _scale_prim(p: Prim, j_old, j_new, s) -> Prim:
    q = np.asarray(p.params, dtype=np.float64).copy()

    def mp(x):
        return j_new + s * (x - j_old)

    if p.type == CONE:
        q[0:3], q[3:6], q[6:8] = mp(q[0:3]), mp(q[3:6]), q[6:8] * s
    elif p.type == TRI:
        q[0:3], q[3:6], q[6:9], q[9] = mp(q[0:3]), mp(q[3:6]), mp(q[6:9]), q[9] * s
    elif p.type == ELL:
        q[0:3], q[12:15] = mp(q[0:3]), q[12:15] * s
    elif p.type == BOX:
        q[0:3], q[12:16] = mp(q[0:3]), q[12:16] * s
    elif p.type == PLANE:
        n = q[0:3]
        p0 = n * q[3]
        q[3] = float(n @ mp(p0))
    return Prim(p.type, q.tolist(), p.op)


def build_anatomy(seed: int = 0) -> Anatomy:
    """The shaped rest anatomy for a seed (seed 0 = the default adult)."""
    shape = Shape.from_seed(seed)
    spine, bounds = _spine_layout()
    j0 = _default_joints()
    structures = _build_default(j0, spine, bounds)
    flesh = _default_flesh({n: j0[i] for i, n in enumerate(JOINT_NAMES)})
    s = _segment_scales(shape)
    pelvis0 = j0[0].copy()
    jn = np.zeros_like(j0)
    for i in range(24):
        p = PARENTS[i]
        jn[i] = (j0[i] - pelvis0) * s[i] if p < 0 else jn[p] + s[p] * (j0[i] - j0[p])
    for st in structures:
        st.prims = [_scale_prim(p, j0[st.seg], jn[st.seg], s[st.seg]) for p in st.prims]
    for fp in flesh:
        fp.prim = _scale_prim(fp.prim, j0[fp.seg], jn[fp.seg], s[fp.seg])
        fp.girth_mm = fp.girth_mm * (shape.girth - 1.0)
    fat = float(np.clip(9.0 + 30.0 * (shape.girth - 1.0), 4.0, 25.0))
    ids = name_to_id()
    for st in structures:
        if st.name and st.name not in ids:
            raise ValueError(f"anatomy label {st.name!r} is not a known label")
    return Anatomy(jn, structures, flesh, shape, skin_mm=2.0, fat_mm=fat, blend_mm=18.0)
