"""End-to-end benchmarks of the ``capflow`` command against the loopback fake OpenAI server.

Run ``python -m benchmarks [scenario ...] [--quick] [--with-reference]``; see README.md here.
"""
