"""Webhooks: the events replies and deletions make, and their signed, retried delivery."""
