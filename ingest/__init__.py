"""Ingest stage: sources, safe fetching, decoding and the batch embedding worker."""
