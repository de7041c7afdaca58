"""Every process-wide setting a run of run.py makes, in one place and in order.

Library code changes no process state: the allocator, the compilation cache, the log filters and
where tracebacks go are the command line's choices, made once here before any work.
"""

from __future__ import annotations

import sys

from absl import logging
import jax

from privattnet_jax.cli import compilation_cache
from privattnet_jax.cli import errors
from privattnet_jax.cli import host_memory
from privattnet_jax.cli import logs


def configure_process(workdir: str | None, config, *, writes_metrics: bool = False) -> None:
  """Applies the settings before anything compiles or allocates device buffers.

  Freed memory kept (host_memory), the compilation cache of `config` (the default folder without
  one: predict, export), the library log filters, the tracebacks of libraries' threads and
  callbacks routed to `workdir`'s errors.log, and, for a run that `writes_metrics`, tensorboardX
  without torch.
  """
  host_memory.keep_freed_memory()
  compilation_cache.enable(
    config.compilation_cache_dir if config is not None else compilation_cache.AUTO
  )
  logs.quiet_library_info(workdir)
  errors.route_library_tracebacks_to_errors_log(workdir)
  if writes_metrics:
    import_tensorboard_without_torch()


def import_tensorboard_without_torch() -> None:
  """Imports tensorboardX with torch hidden, so that the metric writer's import costs no torch.

  tensorboardX's writer imports torch whenever it is installed (the test extra installs it), only
  to accept torch tensors: seconds of a run's start-up for scalars that are Python floats here.
  Hidden during this one import, it falls back to numpy; torch stays importable after. Nothing
  changes where torch or tensorboardX is already imported.
  """
  if "torch" in sys.modules or "tensorboardX" in sys.modules:
    return
  sys.modules["torch"] = None  # `import torch` raises ImportError while this is set.
  try:
    import tensorboardX  # pylint: disable=g-import-not-at-top,unused-import  # noqa: F401
  finally:
    del sys.modules["torch"]


def start_jax(distributed: bool, coordinator_address, num_processes, process_id) -> None:
  """Joins the other processes of a multi-host run (--distributed), then logs the devices."""
  if distributed:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  logging.info(
    "JAX process %d of %d, %d local / %d global devices",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
