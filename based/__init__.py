"""based: fast, exact kernels and layers for BASED-style language models."""
__version__ = "0.1.0"
