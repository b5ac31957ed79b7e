"""(to be written)"""


def register(commands) -> None:
    """No commands yet."""
