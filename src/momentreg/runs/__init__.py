"""Runs as folders: the run configuration and directory, sweeps (local or Ray), reports,
figures and the tightness report."""
