"""`anom <subcommand> [hydra overrides]`: composes conf/<subcommand>.yaml and calls tasks/<subcommand>.run.

Exit codes: 0 done; 1 the task failed (the message says why); 2 bad usage (unknown
subcommand, key, option or value); 3 `infer` could score none of its inputs.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOTHING_SCORED = 0, 1, 2, 3
DISTRIBUTED_TASKS = ("train", "infer")
log = logging.getLogger("anomcli")


def config_dir() -> Path:
    """conf/ of a source checkout, else the copy shipped inside the wheel (anomcli/conf)."""
    package = Path(__file__).resolve().parent
    for candidate in (package.parent / "conf", package / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"no conf/ folder next to {package}")


def usage() -> str:
    from .tasks import TASKS

    width = max(map(len, TASKS))
    lines = ["usage: anom <subcommand> [key=value ...] [hydra flags: --multirun, --cfg job, --help, ...]",
             "", "subcommands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in TASKS.items()]
    lines += ["", "`anom <subcommand> --help` shows its config groups and options.",
              "exit codes: 0 done, 1 failed, 2 bad usage, 3 infer scored nothing"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from .tasks import TASKS

    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return EXIT_OK if argv else EXIT_USAGE
    if argv[0] in ("-V", "--version"):
        from . import __version__
        print(f"anomcli {__version__}")
        return EXIT_OK
    task, rest = argv[0], argv[1:]
    if task not in TASKS:
        print(f"anom: unknown subcommand {task!r}\n\n{usage()}", file=sys.stderr)
        return EXIT_USAGE
    problem = check_overrides(task, rest)
    if problem:
        print(f"anom {task}: {problem}", file=sys.stderr)
        return EXIT_USAGE
    from .engine import distributed

    if not distributed.launched_distributed():
        return run_hydra(task, rest)
    if task not in DISTRIBUTED_TASKS or any(arg in ("-m", "--multirun") for arg in rest):
        print(f"anom {task}: torchrun runs only `train` and `infer`, without --multirun; "
              f"run `anom {task}` as one process", file=sys.stderr)
        return EXIT_USAGE
    distributed.init_process_group()
    try:
        return run_hydra(task, rest + distributed_overrides(task, rest))
    finally:
        distributed.shutdown()


def run_hydra(task: str, args: list[str]) -> int:
    import hydra

    from .config import register_schemas

    register_schemas()
    exit_code = EXIT_OK

    def task_function(cfg) -> None:
        nonlocal exit_code
        exit_code = max(exit_code, run_task(task, cfg))

    saved_argv = sys.argv
    sys.argv = [f"anom {task}", *args]
    try:
        hydra.main(config_path=str(config_dir()), config_name=task, version_base="1.3")(task_function)()
    finally:
        sys.argv = saved_argv
    return exit_code


def distributed_overrides(task: str, args: list[str]) -> list[str]:
    """Under torchrun: every process writes into rank 0's run folder, and only rank 0 writes `.hydra/`.

    The default run folder has a timestamp, which processes started a second apart would
    see differently; rank 0's folder name is sent to all of them.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from .engine import distributed

    overrides = [] if distributed.is_main_process() else ["hydra.output_subdir=null",
                                                            "hydra.job_logging.root.level=WARNING"]
    if any(arg.startswith("hydra.run.dir=") for arg in args):
        return overrides
    run_dir = None
    if distributed.is_main_process():
        GlobalHydra.instance().clear()
        try:
            with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
                cfg = compose(config_name=task, overrides=[a for a in args if not a.startswith("-")],
                              return_hydra_config=True)
                run_dir = str(OmegaConf.select(cfg, "hydra.run.dir"))
        finally:
            GlobalHydra.instance().clear()
    run_dir = distributed.broadcast_from_main(run_dir)
    return [*overrides, f"hydra.run.dir='{run_dir}'"]


def run_task(task: str, cfg) -> int:
    """Run one job; expected failures become a one-line message and an exit code, not a traceback."""
    from hydra.errors import InstantiationException

    from .data.datamodule import DatasetLayoutError, TilingError
    from .data.image_io import ImageReadError
    from .engine.checkpoint import CheckpointError
    from .engine.evaluate import InferenceSettingsError
    from .engine.export import ExportDependencyError
    from .model.encoder import EncoderWeightsError
    from .tasks.common import UsageError
    from .tasks.export import ExportMismatchError
    from .tasks.infer import NothingScoredError

    exit_codes = [(NothingScoredError, EXIT_NOTHING_SCORED),
                  ((UsageError, InferenceSettingsError, TilingError), EXIT_USAGE),
                  ((CheckpointError, DatasetLayoutError, EncoderWeightsError, ImageReadError, ExportDependencyError,
                    ExportMismatchError, FileNotFoundError, FileExistsError), EXIT_FAILED)]
    module = importlib.import_module(f"anomcli.tasks.{task}")
    try:
        module.run(cfg)
    except Exception as error:
        # Hydra wraps what a constructor raised (no weights, bad data root); report the cause
        cause = error.__cause__ if isinstance(error, InstantiationException) and error.__cause__ else error
        for kinds, code in exit_codes:
            if isinstance(cause, kinds):
                where = getattr(cause, "path", None) if isinstance(cause, ImageReadError) else None
                log.error("%s%s", f"{where}: " if where else "", cause)
                return code
        if isinstance(error, InstantiationException) and isinstance(cause, ValueError):
            log.error("%s", cause)  # a constructor refused its arguments (model.width=0, ...): bad usage
            return EXIT_USAGE
        raise
    return EXIT_OK


def check_overrides(task: str, args: list[str]) -> str | None:
    """Compose once before any work, so a typo fails at once and names what is valid."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from .config import register_schemas

    register_schemas()
    try:
        parsed = get_args_parser().parse_args(args)
    except SystemExit:
        return "could not parse the command line (see `anom --help`)"
    if parsed.help or parsed.hydra_help or parsed.info or parsed.shell_completion:
        return None
    overrides = []
    try:
        for override in OverridesParser.create().parse_overrides(parsed.overrides):
            if override.key_or_group.startswith("hydra"):
                continue
            value = next(iter(override.sweep_string_iterator())) if override.is_sweep_override() \
                else override.get_value_element_as_str()
            overrides.append(f"{override.get_key_element()}={value}" if not override.is_delete()
                             or value is not None else override.get_key_element())
    except HydraException as error:
        return str(error)

    def compose_with(items):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return compose(config_name=task, overrides=items)

    try:
        compose_with(overrides)
    except (HydraException, OmegaConfBaseException) as error:
        return explain_composition_error(error, overrides, compose_with)
    finally:
        GlobalHydra.instance().clear()
    return None


def explain_composition_error(error: Exception, overrides: list[str], compose_with) -> str:
    """Add the valid keys of the parent node when the problem is an unknown key."""
    cause = error.__cause__ or error
    key = getattr(cause, "full_key", None)
    message = str(error).split("\n")[0]
    if not key or "not in" not in str(cause):
        detail = f"\n{cause}" if cause is not error else ""
        return f"{str(error).strip()}{detail}"
    parent, _, leaf = key.rpartition(".")
    try:
        cfg = compose_with([o for o in overrides if not o.lstrip("+~").startswith(f"{key}=")])
        from omegaconf import OmegaConf
        node = OmegaConf.select(cfg, parent) if parent else cfg
        valid = sorted(k for k in node.keys() if not str(k).startswith("_"))
    except Exception:  # noqa: BLE001 - fall back to Hydra's own message
        return str(error).strip()
    hint = difflib.get_close_matches(leaf, valid, n=1)
    suggestion = f" Did you mean '{parent + '.' if parent else ''}{hint[0]}'?" if hint else ""
    return (f"{message}\nunknown key '{key}'.{suggestion}\n"
            f"valid keys of '{parent or '<root>'}': {', '.join(valid)}")


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
