"""Streaming chat server: a LangChain chain behind a WebSocket and HTTP streams."""
