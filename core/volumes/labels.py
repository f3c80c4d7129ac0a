"""Label ids and names: TotalSegmentator v2 ``total`` (1-117) plus the project's extra ids (>117).

SPEC section 4: every segmentation the project writes has a ``labels.json`` beside it (id -> name).
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

_DATA = Path(__file__).resolve().parent / "data"

# Structures outside TotalSegmentator's ``total`` map, named after its other tasks where one exists.
EXTRA_NAMES = [
    "tibia_left", "tibia_right", "fibula_left", "fibula_right", "patella_left", "patella_right",
    "radius_left", "radius_right", "ulna_left", "ulna_right", "carpal_left", "carpal_right",
    "metacarpal_left", "metacarpal_right", "phalanges_hand_left", "phalanges_hand_right",
    "tarsal_left", "tarsal_right", "metatarsal_left", "metatarsal_right",
    "phalanges_feet_left", "phalanges_feet_right",
    "skin", "subcutaneous_fat", "muscle", "bowel_gas", "table",
]


@lru_cache(maxsize=1)
def totalseg_names() -> dict[int, str]:
    with open(_DATA / "totalsegmentator_v2_total.json") as f:
        return {int(k): v for k, v in json.load(f).items()}


@lru_cache(maxsize=1)
def all_names() -> dict[int, str]:
    """Every id the project knows: TotalSegmentator v2 total (1-117) and the extras (118+)."""
    names = dict(totalseg_names())
    for i, n in enumerate(EXTRA_NAMES):
        names[118 + i] = n
    return names


@lru_cache(maxsize=1)
def name_to_id() -> dict[str, int]:
    return {n: i for i, n in all_names().items()}


_SKELETAL = re.compile(
    r"^(vertebrae_.*|rib_(left|right)_\d+|sternum|costal_cartilages|skull|sacrum|hip_(left|right)|"
    r"femur_.*|humerus_.*|scapula_.*|clavicula_.*|tibia_.*|fibula_.*|patella_.*|radius_.*|ulna_.*|"
    r"carpal_.*|metacarpal_.*|phalanges_hand_.*|tarsal_.*|metatarsal_.*|phalanges_feet_.*)$"
)


def is_skeletal(name: str) -> bool:
    """Bones, vertebrae, ribs, sternum, costal cartilages and skull (SPEC section 6)."""
    return bool(_SKELETAL.match(name))


def tissue_class(name: str) -> str:
    """Coarse class used for collections and colours: bone, organ, vessel, muscle, skin, other."""
    if is_skeletal(name):
        return "bone"
    if name in ("skin", "subcutaneous_fat"):
        return "skin"
    if name == "muscle" or name.startswith(("gluteus", "autochthon", "iliopsoas")):
        return "muscle"
    if any(s in name for s in ("artery", "vein", "vena", "aorta", "trunk", "atrial_appendage")):
        return "vessel"
    if name == "table":
        return "other"
    return "organ"


# Anatomy name -> the SMPL joint whose transform moves the structure (as in SMPL's skinning: joint j
# moves the segment from j to its child). "{s}" stands for the structure's side (left/right).
# The binding (``core.rig.binding``) ties vertebrae to their own blended bones, ribs to their vertebra
# and the costal cartilages (one label joining ribs 1-10 to the sternum) to their nearest bound
# neighbour; these rules are what every other structure, and every consumer without a binding, uses.
JOINT_RULES = (
    (r"^femur_(left|right)$", "{s}_hip"),
    (r"^(tibia|fibula|patella)_(left|right)$", "{s}_knee"),
    (r"^(tarsal|metatarsal)_(left|right)$", "{s}_ankle"),
    (r"^phalanges_feet_(left|right)$", "{s}_foot"),
    (r"^humerus_(left|right)$", "{s}_shoulder"),
    (r"^(radius|ulna)_(left|right)$", "{s}_elbow"),
    (r"^(carpal|metacarpal)_(left|right)$", "{s}_wrist"),
    (r"^phalanges_hand_(left|right)$", "{s}_hand"),
    (r"^(clavicula|scapula)_(left|right)$", "{s}_collar"),
    (r"^(rib_(left|right)_([7-9]|1[0-2])|vertebrae_T([7-9]|1[0-2])|costal_cartilages)$", "spine2"),
    (r"^(rib_(left|right)_[1-6]|vertebrae_T[1-6]|sternum)$", "spine3"),
    (r"^vertebrae_C\d+$", "neck"),
    (r"^vertebrae_L\d+$", "spine1"),
    (r"^skull$", "head"),
    (r"^(hip_(left|right)|sacrum|vertebrae_S1)$", "pelvis"),
)
_JOINT_RULES = tuple((re.compile(p), j) for p, j in JOINT_RULES)


def joint_for_label(name: str) -> str | None:
    """The SMPL joint that moves a structure, by its TotalSegmentator name (``JOINT_RULES``);
    None where no rule knows it."""
    for pat, joint in _JOINT_RULES:
        m = pat.match(name)
        if m:
            return joint.format(s="left" if "left" in name else "right")
    return None
