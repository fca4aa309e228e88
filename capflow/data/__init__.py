"""Data that ships with capflow: the bundled sample dataset."""
