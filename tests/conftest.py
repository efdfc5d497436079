import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def exports(tmp_path_factory):
    """The default model exported dense (not validated) and compressed at 0.7 (validated), made once per run."""
    from lestd_export.compress import compress_model
    from lestd_export.config import CompressionConfig
    from lestd_export.export import export_model
    from lestd_export.loading import load_model

    root = tmp_path_factory.mktemp("default-export")
    dense = load_model(None)
    dense_report = export_model(dense, root / "dense", validate=False)
    compressed = load_model(None)
    compression = compress_model(compressed.model, CompressionConfig(size_fraction=0.7), progress=False)
    report = export_model(compressed, root / "lestd-0.7")
    return {"root": root, "dense": dense_report, "report": report, "compression": compression,
            "model": compressed}
