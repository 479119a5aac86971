"""The one exception type users see for problems they can fix."""


class Qwen3AotError(Exception):
    """A bad checkpoint, config, artifact or request; the message says what to do."""
