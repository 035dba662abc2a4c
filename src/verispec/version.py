"""verispec's version, in a module of its own so that any layer can read it without importing
the package's facade (verispec/__init__.py imports the generator and everything below it)."""
__version__ = "0.1.0"
