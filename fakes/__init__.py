"""Stand-ins for the services the server talks to, shared by the tests and the benchmarks."""
