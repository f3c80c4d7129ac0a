"""Volumes in LPS patient space: the Volume type, CT and segmentation readers, label names, input plausibility checks."""
