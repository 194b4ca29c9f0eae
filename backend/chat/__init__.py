"""Conversations in memory: their turns, clients, outboxes and relays."""
