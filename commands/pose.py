"""``ctwin pose --twin DIR --pose FILE --out DIR``: the twin's meshes posed, as PLY in world mm.

Bones move rigidly with their bone, soft structures by the transferred LBS weights, and
``body_model.ply`` is the fitted body model posed by its own LBS (fitted betas and residual).
Also writes ``pose.json``: the pose, the translation, and each rigid structure's 4x4 transform
(acquisition world mm -> posed world mm) and any joint-range warnings.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

HELP = "write the twin's meshes posed by a pose file (PLY, world mm)"
DESCRIPTION = ("Pose a twin directory: every structure of meshes/ and the fitted body-model surface, "
               "posed by a pose file (a truth.json, a SMPL pose .npz/.json, or a preset name), "
               "written as PLY in world mm, with pose.json beside them.")


def add_arguments(parser):
    parser.add_argument("--twin", required=True, help="twin directory (ctwin build output)")
    parser.add_argument("--pose", required=True, help="pose file (truth.json, .npz/.json with pose[, transl]) or preset")
    parser.add_argument("--out", required=True, help="output directory for the posed PLY files")


class TwinLayout:
    """What posing needs from a twin directory (SPEC section 4), read directly from its files.

    A small stand-in for ``core.twin.load_twin``: ``meshes`` {name: Mesh} (acquisition pose,
    world mm, ``body_model.ply`` excluded), ``fit`` (dict from fit.npz), ``body_model``,
    ``binding`` (binding.npz if the build saved one, else bound again here).
    """

    def __init__(self, twin_dir):
        from ..core.errors import CtwinError
        from ..core.fileio import read_json
        from ..core.mesh import read_mesh

        d = Path(twin_dir)
        if not (d / "twin.json").is_file():
            raise CtwinError(f"not a twin directory (no twin.json): {d}")
        if not (d / "fit.npz").is_file():
            raise CtwinError(f"twin directory has no fit.npz: {d}")
        self.dir = d
        try:
            self.info = read_json(d / "twin.json")
        except ValueError as exc:
            raise CtwinError(f"twin.json is not valid JSON: {exc}") from None
        with np.load(d / "fit.npz", allow_pickle=False) as z:
            self.fit = {k: np.asarray(z[k]) for k in z.files}
        for key in ("pose", "joints_mm", "transl_mm"):
            if key not in self.fit:
                raise CtwinError(f"fit.npz has no '{key}'")
        mesh_dir = d / "meshes"
        if not mesh_dir.is_dir():
            raise CtwinError(f"twin directory has no meshes/ folder: {d}")
        self.meshes = {p.name[:-4]: read_mesh(p, p.name[:-4]) for p in sorted(mesh_dir.glob("*.ply"))
                       if p.name != "body_model.ply"}
        self._body_model = None
        self._binding = None

    @property
    def body_model(self):
        if self._body_model is None:
            from ..core.body_model import load_body_model

            bm = self.info.get("body_model") or {}
            builtin = bool(bm.get("builtin", True)) or not bm.get("path")
            self._body_model = load_body_model(None if builtin else bm["path"])
        return self._body_model

    @property
    def binding(self):
        if self._binding is None:
            from ..core.binding import bind_structures, load_binding

            path = self.dir / "binding.npz"
            b = load_binding(path) if path.is_file() else None
            if b is None or any(n not in b.rigid and n not in b.soft for n in self.meshes) or any(
                    len(sw.index) != len(self.meshes[n].vertices) for n, sw in b.soft.items() if n in self.meshes):
                b = bind_structures(self.meshes, self.body_model, self.fit)
            self._binding = b
        return self._binding


def pose_twin(twin: TwinLayout, pose, transl_mm=None) -> tuple[dict, dict]:
    """Posed meshes {name: Mesh} (body_model included) and the pose.json record."""
    import warnings

    from ..core.mesh import Mesh
    from ..core.pose import bone_transforms, pose_meshes

    binding = twin.binding
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        posed = pose_meshes(binding, twin.meshes, pose, transl_mm)
    t = binding.armature.transl0_mm if transl_mm is None else np.asarray(transl_mm, dtype=np.float64)
    fit = twin.fit
    verts, _ = twin.body_model.forward(pose=pose, betas=fit.get("betas"), transl_mm=t,
                                       residual_mm=fit.get("residual_mm"))
    posed["body_model"] = Mesh(verts, twin.body_model.faces, "body_model")
    record = {
        "pose": np.asarray(pose, dtype=np.float64).reshape(72),
        "transl_mm": t,
        "bones": {n: m for n, m in sorted(bone_transforms(binding, pose, transl_mm).items())},
        "binding": binding.table(),
        "warnings": [str(w.message) for w in caught],
    }
    return posed, record


def run(args) -> int:
    from ..core.fileio import write_json
    from ..core.mesh import write_ply
    from ..core.poses import resolve_pose
    from ..core.progress import report, step

    with step("reading the twin"):
        twin = TwinLayout(args.twin)
    p = resolve_pose(args.pose)
    with step(f"posing {len(twin.meshes)} structures"):
        posed, record = pose_twin(twin, p["pose"], p["transl"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, (name, mesh) in enumerate(sorted(posed.items())):
        write_ply(mesh, out / f"{name}.ply")
        report(f"wrote {name}.ply", (i + 1) / len(posed))
    write_json(out / "pose.json", record)
    report(f"posed meshes written to {out}")
    return 0
