"""Scoring a twin (SPEC section 6): fit quality, DRR fidelity at the acquisition pose, and, against
a phantom generated at another pose, fidelity at that target pose.

The twin is given only what a user would give: the target pose's parameters. The phantom's truth
at the acquisition pose (``truth.json`` beside the CT the twin was built from) and at the target
pose are used for scoring only.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from ..errors import CtwinError
from ..fileio import read_json
from ..progress import report
from ..drr.carm import default_views
from ..drr.projector import render_drr
from ..meshes.mesh import read_mesh
from ..meshes.metrics import chamfer_mm, enclosure_pct, drr_similarity
from ..volumes.ct import load_ct
from ..volumes.segmentation import load_segmentation
from .articulated import render_posed
from .twin import load_twin
from ..volumes.volume import apply_transform
from ..rig.retarget import check_rest_joints, retarget_pose


def _finite(x):
    x = float(x)
    return x if math.isfinite(x) else None


def _similarity(test, ref) -> dict:
    s = drr_similarity(test, ref)
    out = {"ssim": float(s["ssim"]), "psnr_db": _finite(s["psnr_db"])}
    if out["psnr_db"] is None:
        out["identical"] = True  # mean squared error 0: PSNR is infinite (JSON has no infinity)
    return out


def _summary(per_view: dict) -> dict:
    """Mean SSIM and PSNR over the views (PSNR over the views where it is finite)."""
    out = {"ssim": float(np.mean([v["ssim"] for v in per_view.values()]))}
    ps = [v["psnr_db"] for v in per_view.values() if v["psnr_db"] is not None]
    out["psnr_db"] = float(np.mean(ps)) if ps else None
    if all(v.get("identical") for v in per_view.values()):
        out["identical"] = True
    return out


def fit_scores(twin) -> dict:
    """chamfer_mm and enclosure_pct of the twin's fitted body surface (SPEC section 6)."""
    body = read_mesh(twin.path / "meshes" / "body_model.ply", name="body_model")
    skin = read_mesh(twin.path / "meshes" / "skin.ply", name="skin")
    lo, hi = twin.ct_bbox_mm
    out = {"chamfer_mm": float(chamfer_mm(body, skin, (lo[2], hi[2])))}
    out["enclosure_pct"] = float(enclosure_pct(body.vertices, body.faces, twin.labelmap, twin.names))
    return out


def acquisition_fidelity(twin, size: int = 512, device: str = "auto", keep_images: dict | None = None) -> dict:
    """AP and lateral DRRs of the twin at its acquisition pose, rendered through the articulated path
    (posing machinery on, identity pose), against the DRRs of the original CT."""
    out = {}
    for name, g in twin.default_views(size=size).items():
        ref = render_drr(twin.ct, g, device=device)
        test = twin.render(g, device=device)
        out[name] = _similarity(test, ref)
        if keep_images is not None:
            keep_images[name] = (test, ref, g)
    out.update(_summary(out))
    return out


def _source_truth(twin) -> dict | None:
    """The acquisition truth (truth.json) beside the twin's input CT, if any (mesh twins have none)."""
    ct = twin.meta.get("inputs", {}).get("ct")
    if not ct:
        return None
    ct = Path(ct)
    p = (ct if ct.is_dir() else ct.parent) / "truth.json"
    return read_json(p) if p.is_file() else None


def bone_error(twin, pose, transl_mm, truth_a: dict, truth_b: dict) -> dict:
    """SPEC 6 ``bone_err_mm`` of the twin posed by (pose, transl) against a phantom's truth: per bone,
    the mean distance between its mesh vertices so posed and mapped by T_B inv(T_A); the mean and
    max over bones, the worst bone and every bone's value."""
    moved = twin.bone_transforms(pose, transl_mm)
    meshes = twin.meshes(include_skin=False)
    per = {}
    for name, T in moved.items():
        if name not in truth_a["bones"] or name not in truth_b["bones"] or name not in meshes:
            continue
        v = np.asarray(meshes[name].vertices, dtype=np.float64)
        ta = np.asarray(truth_a["bones"][name], dtype=np.float64)
        tb = np.asarray(truth_b["bones"][name], dtype=np.float64)
        exact = tb @ np.linalg.inv(ta)
        pv = apply_transform(T, v)
        tv = apply_transform(exact, v)
        per[name] = float(np.linalg.norm(pv - tv, axis=1).mean())
    if not per:
        raise CtwinError("no bone of the twin is in the truth's bone table")
    vals = np.array(list(per.values()))
    return {"mean": float(vals.mean()), "max": float(vals.max()), "worst": max(per, key=per.get),
            "per_bone": dict(sorted(per.items()))}


def target_fidelity(twin, truth_dir, size: int = 512, device: str = "auto",
                    keep_images: dict | None = None, retarget: bool = True) -> dict:
    """Pose the twin to the truth's pose and score bones, enclosure and DRRs against it. The truth's
    pose is retargeted from its ``rest_joints`` onto the twin's skeleton (``core.rig.retarget``), relative
    to the acquisition truth when that names the same skeleton; ``retarget="rest"`` uses the rest
    alignment only, ``retarget=False`` the raw pose vector (both for comparison)."""
    truth_dir = Path(truth_dir)
    tb_path = truth_dir / "truth.json"
    if not tb_path.is_file():
        raise CtwinError(f"{truth_dir} has no truth.json; --truth takes a folder written by 'ctwin phantom'")
    truth_b = read_json(tb_path)
    truth_a = _source_truth(twin)
    pose_b = np.asarray(truth_b["pose"], dtype=np.float64)
    transl = twin.transl0_mm
    retargeted = False
    if retarget and truth_b.get("rest_joints") is not None:
        # the truth's pose is read on its own rest skeleton: retarget it onto the twin's, relative to
        # the acquisition truth where that names the same skeleton (core.rig.retarget)

        rest_b = check_rest_joints(truth_b["rest_joints"], f"{tb_path.name}: 'rest_joints'")
        acq = None
        if retarget != "rest" and truth_a is not None and truth_a.get("rest_joints") is not None:
            acq = (np.asarray(truth_a["rest_joints"], dtype=np.float64),
                   np.asarray(truth_a["pose"], dtype=np.float64), twin.pose0)
        new = retarget_pose(pose_b, rest_b, twin.skeleton_rest_mm(), acquisition=acq, located=twin.located_joints())
        retargeted = (new is not pose_b) and ("acquisition" if acq is not None else "rest")
        pose_b = np.asarray(new, dtype=np.float64)
    if truth_a is not None:
        # the same patient on the same table: the truth's translation change carries over
        transl = transl + (np.asarray(truth_b["transl"], dtype=np.float64) - np.asarray(truth_a["transl"]))
    out = {"pose": truth_dir.name, "retargeted": retargeted}

    report("evaluate: bone placement at the target pose")
    if truth_a is None:
        out["bone_err_mm"] = None
        out["bone_err_note"] = "no truth.json beside the twin's input CT: bone errors need the acquisition truth"
    else:
        out["bone_err_mm"] = bone_error(twin, pose_b, transl, truth_a, truth_b)

    report("evaluate: enclosure at the target pose")
    ct_b = load_ct(truth_dir / "ct.nii.gz")
    lab_b, names_b = load_segmentation(truth_dir / "seg.nii.gz", ct_b)
    body = twin.posed_body(pose_b, transl)
    out["enclosure_pct"] = float(enclosure_pct(body.vertices, body.faces, lab_b, names_b))

    report("evaluate: DRRs at the target pose")
    scene = twin.posed_scene(pose_b, transl)

    drr = {}
    for name, g in default_views(ct_b, size=size).items():
        ref = render_drr(ct_b, g, device=device)
        test = render_posed(scene, g, device=device)
        drr[name] = _similarity(test, ref)
        if keep_images is not None:
            keep_images[name] = (test, ref, g)
    out["drr"] = drr
    out.update(_summary(drr))
    return out


def evaluate_twin(twin_dir, truth_dir=None, size: int = 512, device: str = "auto") -> dict:
    """Every SPEC section 6 metric of a twin, as a JSON-ready dict."""
    t0 = time.perf_counter()
    twin = load_twin(twin_dir)
    report("evaluate: fit scores")
    res = {"twin": str(twin.path), "fit": fit_scores(twin)}
    report("evaluate: acquisition-pose DRR fidelity")
    res["acquisition"] = acquisition_fidelity(twin, size=size, device=device)
    if truth_dir is not None:
        res["target"] = target_fidelity(twin, truth_dir, size=size, device=device)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res
