"""The body model: SMPL's kinematic tree, the built-in SMPL-format model and LBS, skeletal landmarks, the fit to a CT."""
