"""Command-line interface (installed as ``emtile.cli``): thin click commands over the Python API."""
