"""The engine: token trees, target passes, KV-cache commit, sampling and the one loop."""
