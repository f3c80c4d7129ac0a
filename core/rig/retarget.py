"""Retargeting poses between skeletons (no ``bpy``).

A SMPL pose vector rotates each bone *relative to the rest skeleton it was made on*: the same 72
numbers put the bones of two skeletons whose rest bones point different ways at different places.
A pose file that names its source skeleton (``rest_joints`` with ``kintree_parents``, an AMASS
file's betas with a source model, or posed world ``joints``) is mapped onto the twin's skeleton so
that every bone turns in the world as the source's bone turns:

- Rest alignment. For each joint j, ``C_j`` is the rotation that carries the target's rest bone(s)
  leaving j onto the source's. When j has one child it is the parent's ``C`` followed by the
  smallest turn that aims the bone (``C_j = C_p S_j``), so the local rotation that the alignment
  adds, ``C_p^T C_j = S_j``, has no twist about the bone: the twist of a bone about its own axis is
  not in the joints, and the twin's fit keeps it as its prior says (no twist at a zero local
  rotation). When j has several children (pelvis, spine3) it is the least-squares rotation of the
  unit directions (Kabsch, ``scipy.spatial.transform.Rotation.align_vectors``). A leaf (head, hands,
  feet) has no bone direction to compare: it takes its parent's ``C``, so its rotation relative to
  its parent carries over (the twin's fit, which cannot see a leaf's rotation either, keeps it
  relative to the parent too).
- The world-frame rotation of bone j relative to the source's rest is ``G_s[j](p)`` (the product of
  the local rotations up the chain). The target takes ``G_t[j] = G_s[j] C_j``: its bone then points
  where the source's posed bone points. In local terms ``r_t[j] = C_parent^T r_s[j] C_j``
  (``r_t[0] = r_s[0] C_0``).
- Translation: the target's pelvis joint is put where the source's is (the file's world
  ``joints[0]`` when given, else ``G_s[0] rest_s[0] + transl``).
- A twin aims only bones toward joints its fit located (``rest_alignment(located=...)``), and when
  one posture is known on both skeletons (the twin's acquisition, from a pose file beside its CT),
  ``C_j = G_s[j](pA)^T G_t[j](p0)`` (``acquisition_alignment``): each bone then turns by its source
  bone's world rotation change from the acquisition, twist included.

Only bone directions matter (lengths do not change a rotation), so two skeletons whose bones point
the same way (the built-in body model, the project's phantom, any of its seeds) are the same source:
``retarget_pose`` then returns the pose object unchanged and the bone transforms are bit-identical.

Also here: poses by inverse kinematics from world joints (``ik_pose``) and relative poses
(``relative_pose``: per-joint changes from the twin's acquisition pose).
"""
from __future__ import annotations

import numpy as np
from pathlib import Path
from scipy.spatial.transform import Rotation

from ..errors import CtwinError
from ..body.skeleton import N_JOINTS, PARENTS, as_pose, rodrigues, rotation_to_rotvec
from ..body.body_model import _read_model_file

# Rest skeletons whose bone directions agree within this angle are the same source (radians).
SAME_DIRECTION_RAD = 1e-9


def _children(parents) -> list:
    return [[c for c in range(len(parents)) if parents[c] == j] for j in range(len(parents))]


def _unit(v):
    v = np.asarray(v, dtype=np.float64)
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.where(n > 1e-12, n, 1.0)


def _min_rotation(a, b) -> np.ndarray:
    """The smallest rotation (3, 3) taking unit vector a onto unit vector b."""
    a, b = _unit(a), _unit(b)
    axis = np.cross(a, b)
    s = np.linalg.norm(axis)
    c = float(np.dot(a, b))
    if s < 1e-15:
        if c > 0:
            return np.eye(3)
        # opposite: half a turn about any axis normal to a
        ref = np.array([1.0, 0.0, 0.0]) if abs(a[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
        return rodrigues(np.pi * _unit(np.cross(a, ref)))
    return rodrigues(axis / s * np.arctan2(s, c))


def _align(dst, src) -> np.ndarray:
    """Rotation R (3, 3) with dst ~ R src for unit direction rows (n, 3): smallest rotation for one
    pair, Kabsch for several."""
    if len(src) == 1:
        return _min_rotation(src[0], dst[0])

    r, _ = Rotation.align_vectors(np.asarray(dst), np.asarray(src))
    return r.as_matrix()


def check_parents(parents, source: str = "kintree_parents") -> np.ndarray:
    """SMPL's 24-joint tree (``core.body.skeleton.PARENTS``): the only tree a twin can be posed with."""
    p = np.asarray(parents).reshape(-1)
    if p.size == 2 * N_JOINTS:  # SMPL's kintree_table (2, 24)
        p = p.reshape(2, N_JOINTS)[0]
    p = np.where(p >= N_JOINTS, -1, p).astype(np.int64)
    p[0] = -1
    if p.size != N_JOINTS or not np.array_equal(p, PARENTS):
        raise CtwinError(f"{source} must be SMPL's 24-joint tree {PARENTS.tolist()}, got {p.tolist()}")
    return p


def check_rest_joints(rest, source: str = "rest_joints") -> np.ndarray:
    try:
        r = np.asarray(rest, dtype=np.float64)
    except (TypeError, ValueError):
        raise CtwinError(f"{source} is not an array of numbers") from None
    if r.size != 3 * N_JOINTS or not np.all(np.isfinite(r)):
        raise CtwinError(f"{source} must hold 24 x 3 finite values (mm), got {r.size} values")
    r = r.reshape(N_JOINTS, 3)
    for j in range(1, N_JOINTS):
        if np.linalg.norm(r[j] - r[PARENTS[j]]) < 1e-6:
            raise CtwinError(f"{source}: joint {j} coincides with its parent (a bone of zero length)")
    return r


def rest_alignment(source_rest, target_rest, parents=PARENTS, located=None) -> np.ndarray:
    """``C`` (24, 3, 3): per joint, the rotation carrying the target's rest bone directions onto the
    source's (see the module docstring). ``located``: the target joints whose positions were
    measured (a twin's fit: ``Twin.located_joints``); a bone toward a joint that was not is the
    target's template, not the patient's, and the fit keeps that joint's rotation relative to its
    parent, so only located children are aimed at (default: all)."""
    s = np.asarray(source_rest, dtype=np.float64).reshape(N_JOINTS, 3)
    t = np.asarray(target_rest, dtype=np.float64).reshape(N_JOINTS, 3)
    ch = _children(parents)
    if located is not None:
        keep = set(int(k) for k in located)
        ch = [[k for k in kids if k in keep] for kids in ch]
    c = np.tile(np.eye(3), (N_JOINTS, 1, 1))
    for j in range(N_JOINTS):  # parents come first in SMPL's order
        p = parents[j]
        cp = np.eye(3) if p < 0 else c[p]
        if not ch[j]:
            c[j] = cp
        elif len(ch[j]) == 1:
            # the parent's alignment, then the smallest turn that aims the bone (no twist of its own)
            c[j] = cp @ _min_rotation(t[ch[j][0]] - t[j], cp.T @ (s[ch[j][0]] - s[j]))
        else:
            c[j] = _align(_unit(s[ch[j]] - s[j]), _unit(t[ch[j]] - t[j]))
    return c


def direction_mismatch_rad(source_rest, target_rest, parents=PARENTS) -> float:
    """Largest angle between corresponding rest bone directions of two skeletons (radians)."""
    s = np.asarray(source_rest, dtype=np.float64).reshape(N_JOINTS, 3)
    t = np.asarray(target_rest, dtype=np.float64).reshape(N_JOINTS, 3)
    kids = np.arange(1, N_JOINTS)
    ds = _unit(s[kids] - s[np.asarray(parents)[kids]])
    dt = _unit(t[kids] - t[np.asarray(parents)[kids]])
    cross = np.linalg.norm(np.cross(ds, dt), axis=1)
    return float(np.max(np.arctan2(cross, np.sum(ds * dt, axis=1))))


def same_skeleton(source_rest, target_rest) -> bool:
    """True when every rest bone points the same way in both skeletons (lengths may differ)."""
    return direction_mismatch_rad(source_rest, target_rest) <= SAME_DIRECTION_RAD


def acquisition_alignment(source_pose, target_pose) -> np.ndarray:
    """``C`` (24, 3, 3) from one posture known on both skeletons (the twin's acquisition: the source's
    pose there and the twin's fitted pose): ``C_j = G_s[j]^T G_t[j]``, so that a later source pose
    moves every twin bone by the source bone's world rotation change from that posture, twist
    included (what joint positions cannot show)."""
    return np.einsum("jki,jkl->jil", global_rotations(source_pose), global_rotations(target_pose))


def _same_rest(a, b) -> bool:
    a = np.asarray(a, dtype=np.float64).reshape(N_JOINTS, 3)
    b = np.asarray(b, dtype=np.float64).reshape(N_JOINTS, 3)
    return bool(np.allclose(a - a[0], b - b[0], atol=1e-6, rtol=0.0))


def retarget_pose(pose, source_rest, target_rest, acquisition=None, located=None):
    """A pose made on ``source_rest`` as a pose of ``target_rest`` (both (24, 3) in SMPL's canonical
    frame). Returns the pose object itself when the skeletons' bones point the same way.

    ``acquisition``: optional ``(source_rest_A, source_pose_A, target_pose_A)``, one posture known on
    both skeletons; when ``source_rest_A`` is this pose's source skeleton, ``acquisition_alignment``
    replaces the rest alignment."""
    if source_rest is None or same_skeleton(source_rest, target_rest):
        return pose
    if acquisition is not None and _same_rest(acquisition[0], source_rest):
        c = acquisition_alignment(acquisition[1], acquisition[2])
    else:
        c = rest_alignment(source_rest, target_rest, located=located)
    return apply_alignment(pose, c)


def apply_alignment(pose, c) -> np.ndarray:
    """The pose (72,) whose world bone rotations are the source pose's followed by the alignment
    ``c`` (24, 3, 3): ``G_t[j] = G_s[j] C_j``, i.e. ``r_t[j] = C_parent^T r_s[j] C_j``."""
    rs = rodrigues(as_pose(pose))
    rt = np.empty_like(rs)
    for j in range(N_JOINTS):
        p = PARENTS[j]
        rt[j] = rs[j] @ c[j] if p < 0 else c[p].T @ rs[j] @ c[j]
    return rotation_to_rotvec(rt).reshape(72)


def retarget_poses(poses, source_rest, target_rest, located=None):
    """``retarget_pose`` for a sequence (T, 72)."""
    poses = np.asarray(poses, dtype=np.float64)
    if source_rest is None or same_skeleton(source_rest, target_rest):
        return poses
    c = rest_alignment(source_rest, target_rest, located=located)
    rs = rodrigues(poses.reshape(len(poses), N_JOINTS, 3))
    rt = np.empty_like(rs)
    for j in range(N_JOINTS):
        p = PARENTS[j]
        rt[:, j] = rs[:, j] @ c[j] if p < 0 else c[p].T @ rs[:, j] @ c[j]
    return rotation_to_rotvec(rt).reshape(len(poses), 72)


def pelvis_world(pose, transl_mm, source_rest, joints_world=None) -> np.ndarray:
    """The source's pelvis joint in world mm: ``joints[0]`` if given, else ``G_0 rest[0] + transl``."""
    if joints_world is not None:
        return np.asarray(joints_world, dtype=np.float64).reshape(N_JOINTS, 3)[0].copy()
    t = np.zeros(3) if transl_mm is None else np.asarray(transl_mm, dtype=np.float64).reshape(3)
    return rodrigues(as_pose(pose)[0]) @ np.asarray(source_rest, dtype=np.float64).reshape(N_JOINTS, 3)[0] + t


def transl_for_pelvis(pose, pelvis_world_mm, armature_rest_mm) -> np.ndarray:
    """The twin's translation that puts its pelvis joint at ``pelvis_world_mm`` at ``pose``."""
    r0 = rodrigues(as_pose(pose)[0])
    return np.asarray(pelvis_world_mm, dtype=np.float64) - r0 @ np.asarray(armature_rest_mm)[0]


def global_rotations(pose) -> np.ndarray:
    rots = rodrigues(as_pose(pose))
    g = np.zeros_like(rots)
    for j in range(N_JOINTS):
        p = PARENTS[j]
        g[j] = rots[j] if p < 0 else g[p] @ rots[j]
    return g


def ik_pose(joints_world, rest_mm, reference_pose):
    """Inverse kinematics: a pose of the skeleton ``rest_mm`` whose bones point along the world joints
    ``joints_world`` (24, 3, mm); returns ``(pose (72,), transl_mm (3,))`` with the pelvis joint at
    ``joints_world[0]``.

    Bone directions fix a joint's rotation up to the twist about a single child; that twist, and the
    rotation of leaf joints (no child to point at), are kept from ``reference_pose`` (the twin's
    acquisition pose): each joint turns by the smallest rotation that aims its bone.
    """
    jw = np.asarray(joints_world, dtype=np.float64)
    if jw.size != 3 * N_JOINTS or not np.all(np.isfinite(jw)):
        raise CtwinError("'joints' must hold 24 x 3 finite values (world mm)")
    jw = jw.reshape(N_JOINTS, 3)
    rest = np.asarray(rest_mm, dtype=np.float64).reshape(N_JOINTS, 3)
    r_ref = rodrigues(as_pose(reference_pose))
    ch = _children(PARENTS)
    g = np.zeros((N_JOINTS, 3, 3))
    for j in range(N_JOINTS):
        p = PARENTS[j]
        guess = r_ref[j] if p < 0 else g[p] @ r_ref[j]
        kids = ch[j]
        if not kids:
            g[j] = guess
            continue
        world = _unit(jw[kids] - jw[j])
        restd = _unit(rest[kids] - rest[j])
        if len(kids) == 1:
            g[j] = _min_rotation(guess @ restd[0], world[0]) @ guess
        else:
            g[j] = _align(world, restd)
    local = np.empty_like(g)
    for j in range(N_JOINTS):
        p = PARENTS[j]
        local[j] = g[j] if p < 0 else g[p].T @ g[j]
    pose = rotation_to_rotvec(local).reshape(72)
    return pose, jw[0] - g[0] @ rest[0]


def relative_pose(delta, pose0, transl0_mm, dtransl_mm=None):
    """A relative pose -> ``(pose (72,), transl_mm (3,))``: each joint's local rotation is the
    acquisition's turned by ``delta[j]`` in the parent's frame (``r_j = R(delta_j) r0_j``; the root's
    parent frame is the world), and the translation is ``t0 + dtransl``."""
    d = rodrigues(as_pose(delta))
    r0 = rodrigues(as_pose(pose0))
    pose = rotation_to_rotvec(d @ r0).reshape(72)
    t = np.asarray(transl0_mm, dtype=np.float64).reshape(3).copy()
    if dtransl_mm is not None:
        t = t + np.asarray(dtransl_mm, dtype=np.float64).reshape(3)
    return pose, t


def model_rest_joints_mm(model_path, betas=None, source: str = "--source-model") -> np.ndarray:
    """Rest joints (24, 3) mm of a SMPL or SMPL+H model file, shaped by ``betas`` (missing betas 0).

    SMPL+H and SMPL-X share SMPL's 22 body joints; their finger chains replace SMPL's hand joints,
    which are taken as the mean of each wrist's finger roots."""
    path = Path(model_path).expanduser()
    if not path.is_file():
        raise CtwinError(f"{source}: model file not found: {path}")
    a = _read_model_file(path)
    for k in ("v_template", "J_regressor", "kintree_table"):
        if k not in a:
            raise CtwinError(f"{source}: {path.name} is not a SMPL-format model (no '{k}')")
    v = np.asarray(a["v_template"], dtype=np.float64)
    if betas is not None and "shapedirs" in a:
        sd = np.asarray(a["shapedirs"], dtype=np.float64)
        b = np.asarray(betas, dtype=np.float64).reshape(-1)
        n = min(len(b), sd.shape[-1])
        v = v + sd[..., :n] @ b[:n]
    jr = a["J_regressor"]
    jr = jr.toarray() if hasattr(jr, "toarray") else np.asarray(jr, dtype=np.float64)
    joints = jr @ v * 1000.0
    kt = np.asarray(a["kintree_table"]).reshape(2, -1)
    parents = np.where(kt[0] >= len(joints), -1, kt[0]).astype(np.int64)
    if len(joints) == N_JOINTS:
        check_parents(parents, source)
        return joints
    if len(joints) < 22 or not np.array_equal(parents[:22], PARENTS[:22]):
        raise CtwinError(f"{source}: {path.name} has {len(joints)} joints and is not SMPL, SMPL+H or SMPL-X")
    out = np.zeros((N_JOINTS, 3))
    out[:22] = joints[:22]
    for hand, wrist in ((22, 20), (23, 21)):
        kids = [c for c in range(22, len(joints)) if parents[c] == wrist]
        if not kids:
            raise CtwinError(f"{source}: {path.name} has no hand joints under joint {wrist}")
        out[hand] = joints[kids].mean(axis=0)
    return out


def pose_for_twin(resolved: dict, armature, reference_rest_mm, acquisition=None, located=None):
    """A resolved pose file (``core.rig.poses.resolve_pose``) as ``(pose (72,), transl_mm or None)`` on a
    twin: a relative pose is applied to the acquisition pose, a file with only world ``joints`` is
    solved by inverse kinematics on the armature, and a pose with ``rest_joints`` is retargeted from
    that skeleton onto ``reference_rest_mm`` (the skeleton the twin's pose vectors are read on; a
    callable is called only when needed), its pelvis joint kept where the source's is.
    ``acquisition``: the twin's acquisition pose as a resolved pose file on its source skeleton
    (``pose``, ``rest_joints``, ``transl`` / ``joints``; a callable is called only when needed):
    poses on that skeleton then move each bone by its world rotation change from the acquisition,
    and the pelvis by its displacement from there. ``located``: see ``rest_alignment``.
    Anything else passes through as it is."""
    pose, transl = resolved.get("pose"), resolved.get("transl")
    if resolved.get("relative"):
        return relative_pose(pose, armature.pose0, armature.transl0_mm, transl)
    if pose is None:
        return ik_pose(resolved["joints"], armature.joints_rest_mm, armature.pose0)
    rest = resolved.get("rest_joints")
    if rest is None:
        return pose, transl
    ref = reference_rest_mm() if callable(reference_rest_mm) else reference_rest_mm
    if same_skeleton(rest, ref):
        return pose, transl
    acq = acquisition() if callable(acquisition) else acquisition
    if acq is not None and (acq.get("rest_joints") is None or acq.get("pose") is None
                            or not _same_rest(acq["rest_joints"], rest)):
        acq = None
    if callable(located):
        located = located()
    new = retarget_pose(pose, rest, ref, None if acq is None else (acq["rest_joints"], acq["pose"], armature.pose0),
                        located=located)
    joints = resolved.get("joints")
    if transl is None and joints is None:
        return new, None
    pelvis = pelvis_world(pose, transl, rest, joints)
    if acq is not None and (acq.get("transl") is not None or acq.get("joints") is not None):
        # displacement of the source's pelvis from the acquisition, applied to the twin's pelvis
        r0 = rodrigues(as_pose(armature.pose0)[0])
        twin_pelvis0 = r0 @ np.asarray(armature.joints_rest_mm)[0] + np.asarray(armature.transl0_mm)
        pelvis = twin_pelvis0 + pelvis - pelvis_world(acq["pose"], acq.get("transl"), rest, acq.get("joints"))
    return new, transl_for_pelvis(new, pelvis, armature.joints_rest_mm)
