"""containerd API subset (generated modules); see generate.py."""
