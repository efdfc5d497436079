"""lestd-export: LeSTD compression of LLM attention, exported to ONNX Runtime in the compressed domain.

Public API (imported lazily so that ``import lestd_export`` stays cheap)::

    from lestd_export import CompressionConfig, load_model, compress_model, save_compressed, load_compressed
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "CompressionConfig": "config",
    "load_model": "loading",
    "compress_model": "compress",
    "save_compressed": "checkpoint",
    "load_compressed": "checkpoint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
