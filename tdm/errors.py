"""The errors tdm raises for bad input, and the one helper that turns any exception into one line.

Every `TDMError` is the user's to fix: its message starts with the input it is about (a config field
such as `teacher.uri`, an option such as `decoder`, a request parameter such as `num_inference_steps`)
and says what is allowed. Entry points print it as one line (`tdm.cli.run_cli`); the serving app answers
it with a 4xx naming the parameter. Anything else is a bug or an outage and keeps its traceback.
"""
from __future__ import annotations


class TDMError(Exception):
    """A user-facing error whose message names the input at fault. Entry points exit with `exit_code`."""

    exit_code = 2


class InputError(TDMError, ValueError):
    """An input that cannot be used: a location that cannot be read, an option out of range."""


class ConfigError(InputError):
    """A field of the run's config (`tdm.config.TDMConfig`); the message starts with its dotted name."""


class ParamError(InputError):
    """A generation parameter the model does not accept. `param` is its name (e.g. `num_inference_steps`),
    `detail` the reason without the name."""

    def __init__(self, param: str, detail: str):
        super().__init__(f"{param}: {detail}")
        self.param, self.detail = param, detail

    def __reduce__(self):  # crosses process boundaries (a Serve replica's answer) with both fields
        return type(self), (self.param, self.detail)


class TeacherChangedError(TDMError):
    """The teacher a run was started with no longer resolves to the same immutable identity."""


def _message_line(exc: BaseException) -> str | None:
    """The first non-empty line of an exception's message, stripped; None when it has none."""
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), None)


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type name when it has none
    (botocore, MLflow and HTTP clients put pages of context after the line that matters)."""
    return _message_line(exc) or type(exc).__name__


def public_message(exc: BaseException) -> str:
    """What a client of the server may read about a failure: the first line of the message, bounded, or a
    plain "internal error" when it has none; never the exception's type name (README, "Serving: errors")."""
    line = _message_line(exc)
    return line[:500] if line else "internal error (see the server log)"


def validation_message(err, what: str = "key") -> str:
    """A pydantic ValidationError as one line naming every dotted field at fault: "unknown <what> 'a.b'"
    for an unknown key, "a.b: <reason> (got <value>)" otherwise."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown {what} '{loc}'")
        elif loc:
            parts.append(f"{loc}: {msg} (got {e.get('input')!r})")
        else:
            parts.append(msg)
    return "; ".join(parts)


def redact(uri: str) -> str:
    """A URI without its user:password@ part, for messages and dry-run output."""
    import re

    return re.sub(r"://[^/@]+@", "://***@", uri)


class NonFiniteTrainingError(TDMError):
    """Training diverged: too many iterations in a row with a non-finite loss or gradient."""


class ServiceUnavailableError(TDMError):
    """A service the job needs (the MLflow tracking server) did not answer, and the job stopped where running the
    same command again resumes it. The message names the service's setting (MLFLOW_TRACKING_URI) and says what
    was kept. Exit code 3: the input was fine, the operator's service was not."""

    exit_code = 3
