"""Serving: uvicorn and its protocols, worker processes and their supervisor."""
