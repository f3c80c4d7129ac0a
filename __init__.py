"""ctwin Blender extension: CT to articulated digital twin, rendered as DRRs.

Importing the package does not import ``bpy``: the core (``core/``) and the CLI work headless.
Blender calls ``register()``, which registers the Blender layer (settings, operators, rig, render
engine, panels) and the ``ctwin`` command for ``blender -c ctwin``; ``unregister()`` removes all
of it again, so the extension can be enabled and disabled repeatedly in one session.
"""

# Blender-layer packages; each has register() and unregister(). Registered in this order: the shared
# part (scene state) first, the panel that draws everything last.
_BLENDER_MODULES = ("blender", "operators", "rig", "render", "ui")
_cli_handle = None
_registered = []


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


def _numba_cuda_redirect():
    """Make ``numba.cuda`` resolve to the bundled numba-cuda package.

    numba-cuda hooks itself in through a ``.pth`` file, which a normal Python environment runs at
    start-up but Blender does not for extension wheels; importing the hook module does the same.
    """
    try:
        import _numba_cuda_redirector  # noqa: F401
    except ImportError:
        pass


def register():
    import bpy

    global _cli_handle
    _numba_cuda_redirect()
    try:
        for mod in _modules():
            mod.register()
            _registered.append(mod)
        _cli_handle = bpy.utils.register_cli_command("ctwin", _cli_entry)
    except Exception:
        unregister()
        raise


def unregister():
    import bpy

    global _cli_handle
    if _cli_handle is not None:
        bpy.utils.unregister_cli_command(_cli_handle)
        _cli_handle = None
    while _registered:
        _registered.pop().unregister()
