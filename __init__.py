"""ctwin Blender extension: CT to articulated digital twin, rendered as DRRs.

Importing the package does not import ``bpy``: the core (``core/``) and the CLI work headless.
Blender calls ``register()``, which registers the Blender layer (operators, rig, render engine,
panels) and the ``ctwin`` command for ``blender -c ctwin``.
"""

# Blender-layer modules; each has register() and unregister(). Registered in this order.
_BLENDER_MODULES = ("properties", "operators", "rig", "render", "ui")
_cli_handle = None


def _modules():
    import importlib
    import importlib.util

    mods = []
    for name in _BLENDER_MODULES:
        full = f"{__name__}.{name}"
        if importlib.util.find_spec(full) is not None:
            mods.append(importlib.import_module(full))
    return mods


def _cli_entry(argv):
    from . import cli

    return cli.main(list(argv), prog="blender -c ctwin")


def register():
    import bpy

    global _cli_handle
    for mod in _modules():
        mod.register()
    _cli_handle = bpy.utils.register_cli_command("ctwin", _cli_entry)


def unregister():
    import bpy

    global _cli_handle
    if _cli_handle is not None:
        bpy.utils.unregister_cli_command(_cli_handle)
        _cli_handle = None
    for mod in reversed(_modules()):
        mod.unregister()
