"""Standard spaces: the MNI152 template and affine registration to it (for atlas-space models such as SPiN)."""
