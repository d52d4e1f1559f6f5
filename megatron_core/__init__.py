"""Megatron-style model-parallel core. Imports torch only, never ``neox``."""
