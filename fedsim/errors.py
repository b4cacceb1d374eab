"""Exception types shared across fedsim.

`FedsimInputError` is the one error the CLI turns into exit code 2: bad user input (config, data,
model path, run directory) found before any training starts. Its message is one line that names the
field or file and what was expected.
"""


class FedsimInputError(Exception):
    """Bad user input: a config field, data file or path that is not what fedsim expects."""


class ConfigError(FedsimInputError):
    """One or more config fields are wrong; the message lists every problem, one per line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class UpdateRejected(Exception):
    """A client update that cannot be folded into the global adapter (wrong keys, shape, dtype,
    non-finite or out-of-range values)."""
