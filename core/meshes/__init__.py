"""Triangle meshes of anatomy: surface extraction, mesh mode (meshes to a synthetic CT), surface and image metrics."""
