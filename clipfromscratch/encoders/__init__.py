"""Image towers (timm, transformers' CLIP vision) and text towers (transformers), looked up by name in registries.

Importing the package registers every family: a module that defines one registers it when imported here.
"""
from clipfromscratch.encoders import hf_vision, image, text  # noqa: F401 - registration
