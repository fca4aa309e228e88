"""Test fixture: a plugin whose import fails (a dependency it needs is missing)."""

raise ImportError("No module named 'capflow_broken_dependency'")
