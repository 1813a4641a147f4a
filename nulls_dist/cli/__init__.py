"""Console entry points of nulls_dist (see setup.py console_scripts)."""
