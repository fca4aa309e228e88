"""Config options of capflow-echo-clash (serving=echo)."""
