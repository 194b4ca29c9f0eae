"""Settings, timings and the README's table of them."""
