"""The project's error types: each message says what was wrong and what to do."""


class EchoDistillError(Exception):
    """Base class of every error the library raises on purpose."""


class ModelLoadError(EchoDistillError):
    """A model file or folder could not be read, or does not fit its config."""


class IncompatiblePairError(EchoDistillError):
    """Teacher and student cannot share one text encoder."""


class ConceptTokenError(EchoDistillError):
    """The concept token or its initializer word is unusable."""


class ConfigError(EchoDistillError, ValueError):
    """A configuration value is unknown or out of range."""


class DataError(EchoDistillError):
    """The concept images cannot be used for training."""


class TokenizerError(EchoDistillError):
    """A tokenizer style is unknown or a tokenizer folder cannot be loaded."""


class BackboneError(EchoDistillError):
    """A discriminator backbone, IP-Adapter projection or ensemble member cannot be loaded or used."""


class OutputWriteError(EchoDistillError, OSError):
    """A file or folder the pack must write cannot be written (no space, no permission, ...)."""


class OutputBusyError(EchoDistillError):
    """Another process is writing the same output (a second training into the same run or file)."""
