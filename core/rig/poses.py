"""Named pose presets and pose-file IO (SPEC section 4).

A pose is 72 floats in SMPL's order (24 axis-angle vectors, ``core.body.skeleton.JOINT_NAMES``).
``pose[0:3]`` rotates SMPL's canonical frame (x left, y up, z front) into LPS world. Every preset
keeps ``global_orient = SUPINE_GLOBAL_ORIENT`` (head at +z, face toward -y, back on the table at
+y), so all presets describe the same patient on the same table; only the limbs move.

Sign conventions in SMPL's canonical rest (T pose, arms along +-x, palms down):
- hip flexion (thigh forward) is a negative rotation about x; knee flexion a positive one;
- the left arm comes down to the side by a negative rotation about z, the right by a positive one;
- the left arm comes forward by a negative rotation about y.
The right side mirrors the left: (rx, ry, rz) -> (rx, -ry, -rz).

``resolve_pose(name_or_path)`` accepts a preset name, a ``truth.json``, or a ``.npz``/``.json`` file
with the keys ``pose`` [, ``transl``] and returns ``{"pose": (72,), "transl": (3,) or None}``, plus
``rest_joints`` / ``joints`` / ``relative`` where the file has them (its source skeleton, world
joints for inverse kinematics, a change from the acquisition pose: ``core.rig.retarget``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import CtwinError
from ..body.skeleton import JOINT_INDEX, SUPINE_GLOBAL_ORIENT, as_pose, rotation_to_rotvec, rodrigues
from ..fileio import atomic_path, write_json
from .retarget import check_parents, check_rest_joints

ACQUISITION_PRESETS = ("supine_arms_down", "supine_arms_up")


def _rot(axis: str, deg: float) -> np.ndarray:
    v = np.zeros(3)
    v["xyz".index(axis)] = np.deg2rad(deg)
    return rodrigues(v)


def _compose(*mats) -> np.ndarray:
    """Rotation vector of the product mats[0] @ mats[1] @ ... (the last one applies first)."""
    m = np.eye(3)
    for r in mats:
        m = m @ r
    return rotation_to_rotvec(m)


def _mirror(rv) -> np.ndarray:
    rv = np.asarray(rv, dtype=np.float64)
    return np.array([rv[0], -rv[1], -rv[2]])


def _pose(**left_right) -> np.ndarray:
    """Build a pose from joint rotation vectors; ``sym_<joint>`` sets left and mirrored right."""
    p = np.zeros((24, 3))
    p[0] = SUPINE_GLOBAL_ORIENT
    for key, rv in left_right.items():
        rv = np.asarray(rv, dtype=np.float64)
        if key.startswith("sym_"):
            j = key[4:]
            p[JOINT_INDEX["left_" + j]] = rv
            p[JOINT_INDEX["right_" + j]] = _mirror(rv)
        else:
            p[JOINT_INDEX[key]] = rv
    return p.reshape(72)


# Arms by the sides, palms toward the thighs: 80 degrees down from the T pose.
_ARM_DOWN = _compose(_rot("z", -80.0))


def _presets() -> dict:
    arm_down_r = _mirror(_ARM_DOWN)
    return {
        "supine_arms_down": _pose(sym_shoulder=_ARM_DOWN),
        "supine_arms_up": _pose(sym_collar=_compose(_rot("z", 12.0)), sym_shoulder=_compose(_rot("z", 68.0)),
                                sym_elbow=_compose(_rot("y", -10.0))),
        "hip_flexion": _pose(sym_shoulder=_ARM_DOWN, left_hip=_compose(_rot("x", -70.0)),
                             right_hip=_compose(_rot("x", -25.0)),
                             left_knee=_compose(_rot("x", 10.0))),
        "knee_flexion": _pose(sym_shoulder=_ARM_DOWN, sym_hip=_compose(_rot("x", -45.0)),
                              sym_knee=_compose(_rot("x", 90.0)), sym_ankle=_compose(_rot("x", -10.0))),
        "sitting": _pose(sym_shoulder=_ARM_DOWN, sym_hip=_compose(_rot("x", -90.0)),
                         sym_knee=_compose(_rot("x", 90.0)), sym_elbow=_compose(_rot("y", -20.0))),
        "walking_stride": _pose(
            left_shoulder=_compose(_rot("x", -25.0), _rot("z", -80.0)),
            right_shoulder=_compose(_rot("x", 20.0), _rot("z", 80.0)),
            left_elbow=_compose(_rot("y", -15.0)), right_elbow=_compose(_rot("y", 25.0)),
            left_hip=_compose(_rot("x", 10.0)), left_knee=_compose(_rot("x", 30.0)),
            right_hip=_compose(_rot("x", -35.0)), right_knee=_compose(_rot("x", 10.0)),
            left_ankle=_compose(_rot("x", 15.0)), right_ankle=_compose(_rot("x", -10.0)),
        ),
        "arm_abducted": _pose(left_shoulder=_compose(_rot("z", -10.0)), right_shoulder=arm_down_r),
        "arm_raised_forward": _pose(left_shoulder=_compose(_rot("y", -90.0)), right_shoulder=arm_down_r),
    }


PRESETS: dict[str, np.ndarray] = _presets()


def _floats(d, key, n, source, unit=""):
    try:
        a = np.asarray(d[key], dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise CtwinError(f"{source}: '{key}' is not a list of numbers") from None
    if a.size != n or not np.all(np.isfinite(a)):
        raise CtwinError(f"{source}: '{key}' must hold {n} finite floats{unit}, got {a.size} values")
    return a


def _from_mapping(d, source: str) -> dict:
    """Validate a pose mapping. Returns ``pose`` (72,) or None (a file with only world ``joints``),
    ``transl`` (3,) or None, and, where the file has them, ``rest_joints`` (24, 3), ``joints``
    (24, 3) and ``relative`` (see ``core.rig.retarget`` and docs/poses.md)."""
    get = d.get if hasattr(d, "get") else (lambda k, default=None: default)
    has = (lambda k: k in d and get(k) is not None)
    if not has("pose") and not has("joints"):
        raise CtwinError(f"{source}: a pose file needs a 'pose' key (72 floats) or world 'joints' (24 x 3 mm)")
    pose = as_pose(_floats(d, "pose", 72, source)).reshape(72) if has("pose") else None
    transl = _floats(d, "transl", 3, source, " (mm)") if has("transl") else None
    out = {"pose": pose, "transl": transl}
    if has("relative") and bool(np.asarray(get("relative")).reshape(-1)[0]):
        if pose is None:
            raise CtwinError(f"{source}: a relative pose needs 'pose' (24 x 3 rotation changes)")
        if has("rest_joints"):
            raise CtwinError(f"{source}: a relative pose is a change on the twin's own skeleton; "
                             "drop 'rest_joints' or give an absolute pose")
        out["relative"] = True
    if has("rest_joints"):
        out["rest_joints"] = check_rest_joints(get("rest_joints"), f"{source}: 'rest_joints'")
        if has("kintree_parents"):
            check_parents(get("kintree_parents"), f"{source}: 'kintree_parents'")
    if has("joints"):
        out["joints"] = _floats(d, "joints", 72, source, " (world mm)").reshape(24, 3)
    return out


def resolve_pose(name_or_path) -> dict:
    """A preset name, a truth.json, or a .npz/.json pose file -> {"pose": (72,), "transl": (3,)|None}."""
    if isinstance(name_or_path, dict):
        return _from_mapping(name_or_path, "pose")
    if isinstance(name_or_path, np.ndarray) or isinstance(name_or_path, (list, tuple)):
        return _from_mapping({"pose": name_or_path}, "pose")
    s = str(name_or_path)
    if s in PRESETS:
        return {"pose": PRESETS[s].copy(), "transl": None}
    path = Path(s)
    if path.suffix.lower() in (".json", ".npz") or path.exists():
        if not path.is_file():
            raise CtwinError(f"pose file not found: {path}")
        if path.suffix.lower() == ".npz":
            try:
                with np.load(path, allow_pickle=False) as z:
                    d = {k: z[k] for k in z.files}
            except Exception as exc:
                raise CtwinError(f"cannot read pose file {path.name}: {exc}") from None
        else:
            import json

            try:
                with open(path) as f:
                    d = json.load(f)
            except (OSError, ValueError) as exc:
                raise CtwinError(f"cannot read pose file {path.name}: {exc}") from None
            if not isinstance(d, dict):
                raise CtwinError(f"{path.name}: a pose file is a JSON object with 'pose' [, 'transl']")
        return _from_mapping(d, path.name)
    raise CtwinError(f"unknown pose '{s}': give a pose file or one of {', '.join(PRESETS)}")


def write_pose_file(path, pose, transl=None) -> None:
    """Write a pose file (.json or .npz) with ``pose`` (72) and ``transl`` (3, mm; zeros if None)."""
    path = Path(path)
    pose = as_pose(pose).reshape(72)
    transl = np.zeros(3) if transl is None else np.asarray(transl, dtype=np.float64).reshape(3)
    if path.suffix.lower() == ".npz":
        with atomic_path(path) as tmp:
            np.savez(tmp, pose=pose, transl=transl)
    elif path.suffix.lower() == ".json":
        write_json(path, {"pose": pose.tolist(), "transl": transl.tolist()})
    else:
        raise CtwinError(f"pose files are .json or .npz, got {path.name}")
