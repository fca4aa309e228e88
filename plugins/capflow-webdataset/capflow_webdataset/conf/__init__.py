"""Config options capflow-webdataset adds (storage=webdataset)."""
