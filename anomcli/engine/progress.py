"""Rich progress bars and tables shared by the tasks."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

# progress goes to stderr; result tables (`results`) to stdout, so they can be piped
console = Console(stderr=True)
results = Console()


def progress_bar(*extra_columns) -> Progress:
    """A bar on stderr; under torchrun only rank 0 draws one."""
    from .distributed import is_main_process

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    *extra_columns, TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                    transient=False, disable=not is_main_process())
