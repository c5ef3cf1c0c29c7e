"""Helpers to test streaming endpoints: an in-process SSE client, fakes, record assertions."""
