"""The ``momentreg`` command line."""
