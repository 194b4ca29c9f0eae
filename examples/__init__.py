"""Chains to serve with `CHAT_CHAIN`: each runs offline, as written, and has its own test."""
