"""Typed errors. Every error says what went wrong and what the user can do about it.

The CLI turns any :class:`LestdError` into a one-line message and exit code 2.
"""


class LestdError(Exception):
    """Base class of all errors raised on purpose by lestd-export."""


class ModelNotFoundError(LestdError):
    """The model argument names no local path, catalogue alias or reachable hub repository."""


class UnsupportedArchitectureError(LestdError):
    """The model's ``config.model_type`` has no entry in the architecture registry."""


class InvalidConfigError(LestdError, ValueError):
    """A compression/export/benchmark setting is out of range or inconsistent."""


class NonFiniteWeightsError(LestdError):
    """The model's attention weights contain NaN or Inf."""


class CheckpointError(LestdError):
    """A compressed checkpoint or export directory is missing files or is inconsistent."""


class OutputExistsError(LestdError):
    """The output path exists and ``overwrite`` was not requested."""


class CorruptFileError(CheckpointError):
    """A file the tool reads is truncated, corrupt or not of the kind its name says."""


class ModelRunError(CheckpointError):
    """ONNX Runtime loads a model file but fails while running it: the file is broken."""


class ExportValidationError(LestdError):
    """A written model disagrees with its reference (PyTorch, or the values it stores) beyond tolerance."""
