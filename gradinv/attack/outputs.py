"""File names of the attack's outputs that other stages read."""

RECONSTRUCTION_FILE = "reconstruction.safetensors"
