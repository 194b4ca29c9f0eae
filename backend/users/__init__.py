"""Who is asking: authentication, quotas and slots."""
