"""Image towers (timm) and text towers (transformers), looked up by name."""
