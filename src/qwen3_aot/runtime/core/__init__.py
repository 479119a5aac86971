"""The engine core: one step of continuous batching over a forward, and the state it owns (scheduler, blocks, requests, sampling)."""
