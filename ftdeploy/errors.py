"""Errors shown to the user as they are: each says what went wrong and what to do."""


class FtdeployError(Exception):
    """Base class: the CLI prints the message and exits with `exit_code`."""

    exit_code = 1


class ConfigError(FtdeployError):
    """The configuration (file, --set overrides, flags) is invalid; the message lists every problem."""

    exit_code = 2


class DataError(FtdeployError):
    """The dataset is unusable; the message names the file and line."""


class ModelError(FtdeployError):
    """The base model cannot be found or used."""


class TemplateError(FtdeployError):
    """The chat template cannot be mapped to an Ollama TEMPLATE."""


class ExportError(FtdeployError):
    """GGUF conversion or quantization failed."""


class OllamaError(FtdeployError):
    """The Ollama server is unreachable, too old, or refused the request.

    What went wrong is the class: a caller catches exactly the kind it can handle (`except ModelNotFoundError`
    where a missing model is expected) and lets every other kind through, while `except OllamaError` still
    catches them all. `kind` names it in JSON output and logs."""

    kind = "ollama"


class UnreachableError(OllamaError):
    """No connection could be made (refused, no route, name not resolved, connect timeout): the one failure
    after which the default address may be replaced by a local server."""

    kind = "unreachable"


class OllamaAuthError(OllamaError):
    """The server (or a proxy in front of it) refused the credentials: HTTP 401, 403 or 407."""

    kind = "auth"


class OllamaTLSError(OllamaError):
    """The TLS handshake with an https server failed: an untrusted certificate, a name mismatch, plain HTTP."""

    kind = "tls"


class ModelNotFoundError(OllamaError):
    """The server answered, and has no model of that name (HTTP 404)."""

    kind = "not_found"


class OllamaServerError(OllamaError):
    """The server was reached and failed the request: an HTTP error, an error inside a progress stream, an
    answer that is not Ollama's JSON, or silence or a dropped connection part-way."""

    kind = "server"


class StageMissingError(FtdeployError):
    """A stage's input has not been produced yet."""


class VerifyError(FtdeployError):
    """The served model failed verification."""

    exit_code = 3


class RewardError(FtdeployError):
    """A GRPO reward function (grpo.rewards) failed when called, or returned what GRPO cannot use: the message names
    the function and the rows it was scoring."""
