"""The one Hydra wrapper of the entry points: register schemas, compose ``configs/<name>.yaml`` with the
command line's overrides, convert with ``OmegaConf.to_object`` and turn ValueErrors into exit status 2."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

CONFIG_DIR = os.environ.get("SP_CONFIG_DIR", str(Path(__file__).resolve().parents[1] / "configs"))


def run_app(config_name: str, prog: str, run: Callable[[Any], object]) -> None:
    import hydra
    from omegaconf import OmegaConf

    from cli.schema import register

    register()

    @hydra.main(version_base=None, config_path=CONFIG_DIR, config_name=config_name)
    def _app(cfg: Any) -> None:
        try:
            run(OmegaConf.to_object(cfg))
        except ValueError as e:
            print(f"{prog}: error: {e}", file=sys.stderr)
            sys.exit(2)

    # no Hydra output folder or log files: these are CLI tools, their outputs are named by the user
    sys.argv += ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none"]
    _app()
