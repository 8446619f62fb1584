"""Models: the registry, image preprocessing, committee maths and the calibration search (no Beam here)."""
