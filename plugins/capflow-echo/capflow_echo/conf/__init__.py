"""Config options capflow-echo adds (serving=echo)."""
