"""The engine services share: the loop that owns the core (in this process or its own), the Engine callers hold, their streams."""
