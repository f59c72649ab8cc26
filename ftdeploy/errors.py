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
    """The Ollama server is unreachable, too old, or refused the request."""


class StageMissingError(FtdeployError):
    """A stage's input has not been produced yet."""


class VerifyError(FtdeployError):
    """The served model failed verification."""

    exit_code = 3
