"""The routes: WebSocket sessions, HTTP streams, the AI SDK, REST, and the admission gate."""
