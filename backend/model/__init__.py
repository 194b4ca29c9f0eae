"""The model: upstreams (remote or embedded), the chain, its callbacks, history and one reply."""
