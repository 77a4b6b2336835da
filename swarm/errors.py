"""Errors that are the user's to fix: the CLI prints them as one line and exits non-zero, without a traceback."""


class UserError(Exception):
    """A problem with the user's input or environment (config, join address, model path...).

    :param message: one line that names the file, key, peer or row at fault
    :param exit_code: the process exit code the CLI uses for it (2 = bad config/usage, 1 = runtime problem)
    """

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class ConfigError(UserError):
    """A malformed config file, an unknown key or a value of the wrong type (exit code 2)."""

    def __init__(self, message: str):
        super().__init__(message, exit_code=2)
