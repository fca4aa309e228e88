"""Test helpers for capflow and its plugins (fake OpenAI-compatible server)."""
