"""The one Hydra wrapper of the entry points: register schemas, compose ``configs/<name>.yaml`` with the
command line's overrides, convert with ``OmegaConf.to_object`` and turn ValueErrors into exit status 2."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

CONFIG_DIR = os.environ.get("SP_CONFIG_DIR", str(Path(__file__).resolve().parents[1] / "configs"))


def usage(prog: str, description: str, groups: tuple[str, ...]) -> str:
    """The tool's own ``--help``: what it does and only the config groups it accepts, with their options."""
    lines = [f"{prog}: {description}", "", f"usage: {prog} [GROUP=OPTION ...] [KEY=VALUE ...]   (Hydra overrides)",
             f"       {prog} --cfg job     print the composed config and exit",
             f"       {prog} --info        Hydra's search path and defaults tree", "", "config groups:"]  # fmt: skip
    from cli.overrides import options

    for g in groups:
        lines.append(f"  {g}: {', '.join(options(CONFIG_DIR, g))}")
    lines += ["", f"Any key of the composed config can be overridden (e.g. train.steps=100); `{prog} --cfg job`",
              "lists them all with their values. Errors name the bad value and the valid options."]  # fmt: skip
    return "\n".join(lines)


def check_declared(cfg: Any, path: str = "") -> None:
    """Every key of the composed config is a field of its schema. Hydra's ``+key=value`` adds keys to
    structured nodes, and ``OmegaConf.to_object`` would then drop them silently: refuse them instead,
    naming the key and the valid ones (free-form dict fields, e.g. ``model.rope_scaling``, are not checked)."""
    import dataclasses

    from omegaconf import DictConfig, OmegaConf

    typ = OmegaConf.get_type(cfg)
    if dataclasses.is_dataclass(typ):
        valid = sorted(f.name for f in dataclasses.fields(typ))
        for key in cfg:
            if key not in valid:
                where = path.rstrip(".") or "the config"
                raise ValueError(f"unknown config key {path + str(key)!r}; valid keys of {where}: {', '.join(valid)}")
    for key in cfg:
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(node)):
            check_declared(node, f"{path}{key}.")


def run_app(
    config_name: str, prog: str, run: Callable[[Any], object], description: str = "", groups: tuple[str, ...] = ()
) -> None:
    import hydra
    from omegaconf import OmegaConf

    from cli import overrides
    from cli.schema import ROOTS, register

    if any(a in ("--help", "-h") for a in sys.argv[1:]):
        print(usage(prog, description, groups))
        sys.exit(0)
    only_check = "--check" in sys.argv[1:]  # compose and validate, then exit (make train runs it before torchrun)
    args = [a for a in sys.argv[1:] if a != "--check"]
    try:
        overrides.check(args, ROOTS[config_name], CONFIG_DIR, groups)
    except ValueError as e:
        if overrides.is_rank0():  # one message, not one per rank
            print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    register()

    @hydra.main(version_base=None, config_path=CONFIG_DIR, config_name=config_name)
    def _app(cfg: Any) -> None:
        try:
            check_declared(cfg)
            job = OmegaConf.to_object(cfg)
            if only_check:
                return
            run(job)
        except ValueError as e:  # found before the ranks connect (the config): the same on every rank
            if overrides.is_rank0():
                print(f"{prog}: error: {e}", file=sys.stderr)
            sys.exit(2)

    # no Hydra output folder or log files: these are CLI tools, their outputs are named by the user. The
    # settings go first, so that a trailing `--cfg` / `--info` does not take one as its argument.
    if args and args[-1] in ("--cfg", "-c"):
        args.append("job")  # `--cfg` alone: the job's config
    sys.argv[1:] = ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=none",
                    "hydra/hydra_logging=none", *args]  # fmt: skip
    _app()
