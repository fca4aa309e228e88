"""capflow's built-in config tree (the repository's conf/ folder, shipped as capflow.conf)."""
