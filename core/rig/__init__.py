"""Rig maths: the armature, binding structures to bones, posing, pose presets and files, motion import, retargeting."""
