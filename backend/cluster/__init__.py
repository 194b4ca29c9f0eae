"""Workers sharing conversations through Redis: leases, streams, the relay."""
