"""M4CXR on Ray. The package's progress lines go through `logging` (loggers named m4cxr.*);
entry points (the `m4cxr` command, the job scripts) show them with `log_progress()`."""

import logging


def log_progress() -> None:
    """The package's progress lines (m4cxr.* loggers, INFO and up) on stderr, other libraries'
    from WARNING up (basicConfig leaves a root logger that has handlers, as under pytest, alone)."""
    logging.basicConfig(format="%(message)s")
    logging.getLogger("m4cxr").setLevel(logging.INFO)
