"""The twin: articulated decomposition and warp, the twin directory (build, load, render), evaluation, report, registration, annotations."""
