"""Every process-wide setting a run of run.py makes, in one place and in order.

Library code changes no process state: the allocator, the compilation cache, the log filters and
where tracebacks go are the command line's choices, made once here before any work.
"""

from __future__ import annotations

from absl import logging
import jax

from privattnet_jax.cli import compilation_cache
from privattnet_jax.cli import errors
from privattnet_jax.cli import host_memory
from privattnet_jax.cli import logs


def configure_process(workdir: str | None, config) -> None:
  """Applies the settings before anything compiles or allocates device buffers: freed memory kept
  (host_memory), the compilation cache of `config` (the default folder without one: predict,
  export), the library log filters, and the tracebacks of libraries' threads and callbacks routed
  to `workdir`'s errors.log."""
  host_memory.keep_freed_memory()
  compilation_cache.enable(
    config.compilation_cache_dir if config is not None else compilation_cache.AUTO
  )
  logs.quiet_library_info(workdir)
  errors.route_library_tracebacks_to_errors_log(workdir)


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
