"""What clients send and are told: their messages parsed, and the error codes."""
