"""Config options capflow-dedup adds (pipeline=dedup_caption)."""
