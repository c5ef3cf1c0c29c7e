"""Adapters: provider streams in (openai) and framework glue where one is needed."""
