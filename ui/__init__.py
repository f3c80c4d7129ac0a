"""Blender layer: the user interface (the "ctwin" N-panel, ``panel``)."""


def register():
    from . import panel

    panel.register()


def unregister():
    from . import panel

    panel.unregister()
