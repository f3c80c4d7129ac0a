"""Blender layer, shared part: bulk numpy <-> Blender transfer (``data``), the typed scene state
``scene.ctwin`` (``properties``) and scene look-ups (``scene``). Everything else in the Blender
layer (``operators/``, ``rig/``, ``render/``, ``ui/``) builds on it; it imports none of them.

Importing the package does not import ``bpy``; its modules do.
"""


def register():
    from . import properties

    properties.register()


def unregister():
    from . import properties

    properties.unregister()
