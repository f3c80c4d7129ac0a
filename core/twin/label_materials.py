"""Segmentation labels that override the HU calibration's materials in a posed twin.

A plain CT takes the override as reserved HU codes at the label's voxels
(``core.drr.xray.apply_label_materials``). A twin's frame is composed from its articulated CT (rigid
parts, warped soft tissue) by trilinear resampling, which would blend reserved codes into meaningless
values, so here the codes are carried by a second scene per override material: the same parts,
placements, warp and grid, whose voxels hold an indicator (+1000 HU on the label, -1000 HU off it)
instead of HU. Composed like the frame, the indicator says where the label lies in this pose (above
0: more than half of the trilinearly resampled voxel is label), and those voxels of the composed frame
take the material's code. The label therefore moves with whatever carries its voxels in the
articulated CT: a rigid part (a screw within a bone's mask moves with the bone) or the soft tissue.
At the acquisition pose nothing is resampled and the codes are the label's voxels exactly, as for
the plain CT.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
from scipy import ndimage

from ..drr.projector import PreparedVolume, Scene, frame_volume, prepare_volume
from ..drr.xray import OVERRIDE_CODE0, label_codes
from ..errors import CtwinError
from ..volumes.volume import Volume, resample_onto

ON, OFF = 1000, -1000  # indicator values (HU): the label, not the label (air: empty-space skipping)


class LabelOverrides:
    """Override materials of an articulated CT's labels, carried through its poses (``frame``)."""

    def __init__(self, art, labelmap, names: dict, mapping: dict, defaults: bool = True):
        lab = np.asarray(labelmap.data)
        if lab.shape != tuple(art.shape) or not np.allclose(labelmap.affine, art.affine, atol=1e-4):
            lab = resample_onto(labelmap, Volume(np.zeros(art.shape, np.int16), art.affine), order=0)
        codes, self.materials, self.applied = label_codes(lab, names, mapping, defaults)
        # voxels of the soft tissue that hold the CT (not the filled interiors of the parts' masks, as
        # ``core.twin.articulated.prepare_articulated`` fills them)
        union = np.zeros(art.shape, bool)
        for p in art.parts:
            t = p.offset_on(art.affine)
            sl = tuple(slice(int(a), int(a) + n) for a, n in zip(t, p.mask.shape))
            union[sl] |= p.mask > 0
        interior = ndimage.binary_erosion(union, structure=np.ones((3, 3, 3), bool), border_value=1)
        self._scenes = []
        for k in range(len(self.materials)):
            on = codes == k + 1
            soft = np.where(on & ~interior, ON, OFF).astype(np.int16)
            parts = []
            for p in art.parts:
                t = p.offset_on(art.affine)
                sl = tuple(slice(int(a), int(a) + n) for a, n in zip(t, p.mask.shape))
                parts.append(np.where(on[sl], ON, OFF).astype(np.int16))
            warp_base = None
            statics = [p for p in art.parts if p.kind == "static"]
            if statics:
                warp_base = soft.copy()
                for p in statics:
                    t = p.offset_on(art.affine)
                    sl = tuple(slice(int(a), int(a) + n) for a, n in zip(t, p.mask.shape))
                    warp_base[sl][p.mask > 0] = OFF
            self._scenes.append({"base": Volume(soft, art.affine.copy()), "parts": parts,
                                 "names": [p.name for p in art.parts], "warp_base": warp_base,
                                 "resident": {}})

    def frame(self, scene) -> PreparedVolume:
        """The scene's frame (``core.drr.projector.frame_volume``: HU, composed where posed) with the
        voxels of each override label in this pose set to its material's reserved code."""
        hu = frame_volume(scene)
        if not self.materials:
            return hu
        data = np.array(hu.flat, dtype=np.int16, copy=True)
        data[(data >= OVERRIDE_CODE0) & (data < OVERRIDE_CODE0 + len(self.materials))] = -1024
        for k, ind in enumerate(self._scenes):
            data[self._indicator(scene, ind, hu.shape).flat > 0] = OVERRIDE_CODE0 + k
        return prepare_volume(Volume(data.reshape(hu.shape), hu.affine))

    def _indicator(self, scene, ind: dict, shape) -> PreparedVolume:
        if not isinstance(scene, Scene):
            raise CtwinError("label overrides of a twin need its posed scene")
        if [p.name for p in scene.parts] != ind["names"]:
            raise CtwinError("the posed scene's parts are not the articulated CT's the overrides were built for")
        parts = [replace(p, data=d) for p, d in zip(scene.parts, ind["parts"])]
        s = Scene(ind["base"], parts, warp=scene.warp, grid=scene.grid, compose=True,
                  warp_base=ind["warp_base"], info=scene.info, resident=ind["resident"])
        out = frame_volume(s)
        if tuple(out.shape) != tuple(shape):
            raise CtwinError("the label indicator's frame is not on the posed frame's grid")
        return out
