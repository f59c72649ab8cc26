"""The package's version, in a module that imports nothing: every module reads it from here, so none of them imports
the package itself (whose attributes load the Python API on first use)."""

__version__ = "0.1.0"
