"""Config options capflow-metrics adds (+metrics=files)."""
