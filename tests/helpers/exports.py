"""An exported model file made directly from a model (no training, no checkpoint): what predict reads."""

from __future__ import annotations

import json
from pathlib import Path


def write_export(path: Path, cfg, model) -> str:
    """`model`'s weights + `cfg` in the format e2e_dist.export writes; returns the path."""
    from safetensors.torch import save_file

    from e2e_dist import export

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"format": "pt", export.META_FORMAT: export.EXPORT_FORMAT,
                        export.META_CONFIG: json.dumps(cfg.to_public_dict())})
    return str(path)
