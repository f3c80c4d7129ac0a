"""ctwin core: everything that does not need Blender.

Volumes, labels, meshes, the body model, the phantom, fitting, rig maths, projection geometry and
the DRR kernels live here and import numpy/scipy/numba only, never ``bpy``.
"""
