"""Our train step against the authors' PyTorch original, side by side in one process.

  python -m benchmarks.peer_benchmark                         # 224 px, batch 32, 3 windows
  python -m benchmarks.peer_benchmark --batch_size=4 --steps=1 --windows=1   # a quick check

The peer is AMNet's `AMemNetModel(ResNet50FC(), seq_steps=3, a_res=14, a_vec_size=1024)`, the
PrivAttNet authors' code, in plain torch.nn (benchmarks/torch_amnet.py): frozen ResNet-50 to layer3
in train mode (BatchNorm batch statistics, as the authors ran it), AMNet's head, MSE + attention
penalty, Adam lr 1e-4 with L2 1e-6. Ours is the project's own train step
(`train_steps.parallel_train_step`) on the paper's config (configs/privattnet.py), frozen encoder.

Paths (--paths):
- image: random images (B, S, S, 3) fp32 through encoder + head, both frameworks. torch runs the
  authors' NCHW layout (the judged comparison) and, with --torch_layouts, channels_last as well.
- cache: our head trained from cached encoder features (batch key `features`, in the cache's
  dtype, --cache_dtype, as the feature cache's loader hands them to the step) against torch's image
  path (the judged ratio: the authors had no cache); torch's head alone trained from fp32
  features is printed as an extra line.
- bf16: ours with config.model.half_precision=True (image path and cache path), torch under
  autocast(cpu, bfloat16) (image path); each framework's bf16 is set against its fp32 where that
  was measured.

Every participant is warmed up (compiled) first; then, for --windows windows, each in turn runs
--steps steps (ours, torch, ours, torch, ...), so both frameworks see the same machine. Reported:
best and median img/s of the windows, and ours/torch as best/best and median/median.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable

from absl import app
from absl import flags
import jax
import numpy as np

from benchmarks import common
from configs import privattnet
from privattnet_jax.training import feature_cache
from privattnet_jax.cli import host_memory
from privattnet_jax.training import train_steps

PATHS = ("image", "cache", "bf16")
LAYOUTS = ("nchw", "channels_last")

flags.DEFINE_integer("batch_size", 32, "Global batch size, both frameworks.")
flags.DEFINE_integer("steps", 5, "Steps per timed window, per participant.")
flags.DEFINE_integer("windows", 3, "Timed windows; the participants alternate within each.")
flags.DEFINE_integer(
  "threads",
  len(os.sched_getaffinity(0)),
  "torch.set_num_threads (default: the cores this process may use, which JAX's CPU backend uses).",
)
flags.DEFINE_list("paths", list(PATHS), f"Which of {PATHS} to time.")
flags.DEFINE_integer("image_size", 224, "Input side in pixels (the grid is image_size / 16).")
flags.DEFINE_list(
  "torch_layouts",
  list(LAYOUTS),
  "torch image-path memory formats: nchw (the authors' code as published) and/or channels_last.",
)
flags.DEFINE_enum(
  "cache_dtype", "bfloat16", list(feature_cache.DTYPES), "Cached feature dtype (cache path)."
)
flags.DEFINE_bool(
  "keep_freed_memory",
  False,
  "Both frameworks under host_memory.keep_freed_memory, as run.py runs ours (malloc keeps freed "
  "pages: no page faults per step). It speeds torch up as much as ours, and one process cannot "
  "give it to one side only; off (default): both under the default allocator, as the authors' "
  "code runs.",
)
flags.DEFINE_bool("peak", True, "Measure this machine's fp32/bf16 matmul peak (JAX) first.")
FLAGS = flags.FLAGS


@dataclasses.dataclass
class Participant:
  name: str
  framework: str  # "ours" or "torch"
  run: Callable[[int], None]  # Runs n steps and waits for them.
  flops_per_image: float | None = None
  dtype: str = "float32"  # The compute dtype, for the matmul peak it is set against.
  rates: list = dataclasses.field(default_factory=list)

  def best(self) -> float:
    return max(self.rates)

  def median(self) -> float:
    return statistics.median(self.rates)


def machine_info(torch) -> str:
  model = platform.processor() or "?"
  try:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    model = next(
      line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")
    )
  except (OSError, subprocess.CalledProcessError, StopIteration):
    pass
  cores = len(os.sched_getaffinity(0))
  capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "?")()
  return "\n".join(
    [
      f"date {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
      f"cpu {model!r}, {cores} usable cores (of {os.cpu_count()}), load average "
      f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}",
      f"python {platform.python_version()}, jax {jax.__version__} "
      f"(backend {jax.default_backend()}, {jax.device_count()} x {jax.devices()[0].device_kind}), "
      f"torch {torch.__version__} (threads {torch.get_num_threads()}, "
      f"interop {torch.get_num_interop_threads()}, cpu capability {capability}, "
      f"mkldnn {torch.backends.mkldnn.is_available()})",
      "note: JAX's CPU backend uses every usable core and no flag changes that here; for another "
      "thread count run under taskset and pass the same --threads.",
    ]
  )


# ----------------------------------------------------------------------------------------- ours


def make_config(half_precision: bool):
  config = privattnet.get_config()  # Frozen ResNet-50 to conv4_x, BatchNorm 'update': the paper.
  config.input.image_size = FLAGS.image_size
  config.input.batch_size = FLAGS.batch_size
  config.model.half_precision = half_precision
  return config


class Ours:
  """The project's train step for one config (fp32 or bf16), through the public API only."""

  def __init__(self, half_precision: bool):
    self.config = make_config(half_precision)
    self.state, self.step, self.mesh = common.train_step_for(self.config)

  def head_parameter_count(self) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(self.state.params["head"]))

  def participant(self, name: str, batch: dict, dtype: str = "float32") -> Participant:
    """A participant training a copy of the initial state on `batch` (host arrays)."""
    device_batch = train_steps.shard_batch(batch, self.mesh)
    state = jax.tree_util.tree_map(lambda x: x.copy(), self.state)  # The step donates its state.
    lowered = self.step.lower(state, device_batch)
    flops = common.flops_per_image(lowered, FLAGS.batch_size)
    compiled = lowered.compile()
    holder = {"state": state}

    def run(n: int) -> None:
      state, metrics = holder["state"], None
      for _ in range(n):
        state, metrics = compiled(state, device_batch)
      jax.block_until_ready(metrics)
      holder["state"] = state

    return Participant(name, "ours", run, flops, dtype)


# ---------------------------------------------------------------------------------------- torch


class Torch:
  """AMNet's model and optimiser; one fresh copy per participant."""

  def __init__(self, torch, torch_amnet):
    self.torch, self.amnet = torch, torch_amnet
    self.grid = FLAGS.image_size // 16

  def model(self):
    self.torch.manual_seed(12345)  # AMNet's seed.
    return self.amnet.freeze_encoder(self.amnet.AMemNet(a_res=self.grid))

  def image_participant(self, name, images_nhwc, score, layout, autocast_dtype=None):
    torch = self.torch
    model = self.model()
    images = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2)  # NHWC -> NCHW, a strided view.
    if layout == "channels_last":
      model = model.to(memory_format=torch.channels_last)
      images = images.contiguous(memory_format=torch.channels_last)  # What the view already is.
    else:
      images = images.contiguous()
    return self._participant(name, model, images, score, autocast_dtype)

  def head_participant(self, name, features_nhwc, score):
    model = self.model().head  # The head alone, trained from (fp32) features: no encoder at all.
    features = self.torch.from_numpy(features_nhwc).permute(0, 3, 1, 2).contiguous()
    return self._participant(name, model, features, score, None)

  def _participant(self, name, model, inputs, score, autocast_dtype):
    optimizer = self.amnet.make_optimizer(model)
    target = self.torch.from_numpy(score[:, 0].copy())

    def run(n: int) -> None:
      for _ in range(n):
        self.amnet.train_step(model, optimizer, inputs, target, autocast_dtype)

    return Participant(name, "torch", run)

  def counted_flops(self, participant: Participant) -> float | None:
    """FLOPs per image of one step as torch's FlopCounterMode counts them (convs, matmuls)."""
    try:
      from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=g-import-not-at-top
    except ImportError:
      return None
    with FlopCounterMode(display=False) as counter:
      participant.run(1)
    return counter.get_total_flops() / FLAGS.batch_size


# ----------------------------------------------------------------------------------------- main


def alternate(participants: list[Participant]) -> None:
  for participant in participants:  # Warm-up: compile, allocate, create oneDNN primitives.
    participant.run(2)
  for _ in range(FLAGS.windows):
    for participant in participants:
      start = time.perf_counter()
      participant.run(FLAGS.steps)
      participant.rates.append(FLAGS.steps * FLAGS.batch_size / (time.perf_counter() - start))


def report(title: str, participants, peaks: dict) -> None:
  print(f"\n== {title}", flush=True)
  for p in participants:
    line = (
      f"{p.framework:5s} {p.name:38s} best {p.best():8.2f} img/s  median {p.median():8.2f} img/s"
    )
    if p.flops_per_image is not None:
      achieved = p.median() * p.flops_per_image
      line += f"  {p.flops_per_image / 1e9:6.2f} GFLOP/img  {achieved / 1e9:7.1f} GFLOP/s"
      peak = peaks.get(p.dtype)
      if peak:
        line += f"  {achieved / peak:5.1%} of matmul peak"
    print(line, flush=True)


def ratio_line(label: str, ours: Participant, theirs: Participant) -> str:
  return (
    f"ratio {label}: ours {ours.name} / torch {theirs.name}: best/best "
    f"{ours.best() / theirs.best():.2f}x, median/median {ours.median() / theirs.median():.2f}x"
  )


def main(argv):
  del argv
  if FLAGS.keep_freed_memory:  # Process-wide: the peer runs under it too.
    host_memory.keep_freed_memory()
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    sys.exit(
      "peer_benchmark: PyTorch is not installed, so there is no peer to time "
      "(pip install -e '.[test]' installs it)."
    )
  from benchmarks import torch_amnet  # pylint: disable=g-import-not-at-top

  paths = [p for p in FLAGS.paths if p]
  for name in paths:
    if name not in PATHS:
      raise app.UsageError(f"--paths: {name!r} is not one of {PATHS}")
  layouts = [layout for layout in FLAGS.torch_layouts if layout]
  if not layouts or any(layout not in LAYOUTS for layout in layouts):
    raise app.UsageError(f"--torch_layouts must name some of {LAYOUTS}")
  if FLAGS.image_size % 16:
    raise app.UsageError("--image_size must be a multiple of 16")
  if FLAGS.batch_size % jax.device_count():
    raise app.UsageError("--batch_size must be a multiple of the device count")
  torch.set_num_threads(FLAGS.threads)

  print(machine_info(torch), flush=True)
  batch, size, grid = FLAGS.batch_size, FLAGS.image_size, FLAGS.image_size // 16
  print(
    f"batch {batch}, {size} px, grid {grid}x{grid}, {FLAGS.windows} windows x {FLAGS.steps} steps "
    f"per participant, alternating; paths {','.join(paths)}; torch layouts {','.join(layouts)}; "
    f"allocator: {'keep_freed_memory (both)' if FLAGS.keep_freed_memory else 'default (both)'}",
    flush=True,
  )
  peaks = {}
  if FLAGS.peak:
    peaks["float32"] = common.matmul_peak_flops(jax.numpy.float32)
    if "bf16" in paths:
      peaks["bfloat16"] = common.matmul_peak_flops(jax.numpy.bfloat16)
    print(
      "measured JAX matmul peak: "
      + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items()),
      flush=True,
    )

  rng = np.random.default_rng(0)
  images = rng.standard_normal((batch, size, size, 3), np.float32)
  features_fp32 = rng.standard_normal(
    (batch, grid, grid, torch_amnet.ResNet50FC.channels), np.float32
  )
  cache_dtype = np.dtype(feature_cache.DTYPES[FLAGS.cache_dtype])
  cached = features_fp32.astype(cache_dtype)  # As the cache's loader hands them to the step.
  batch_targets = common.random_targets(rng, batch)
  image_batch = {"image": images, **batch_targets}
  feature_batch = {"features": cached, **batch_targets}
  score = batch_targets["score"]

  ours32 = Ours(half_precision=False)
  peer = Torch(torch, torch_amnet)
  theirs_head = torch_amnet.AMNetHead(torch_amnet.ResNet50FC.channels, grid)
  ours_count, theirs_count = (
    ours32.head_parameter_count(),
    torch_amnet.count_parameters(theirs_head),
  )
  redundant = theirs_head.rnn.bias_hh_l0.numel()
  print(
    f"head parameters: ours {ours_count:,}, AMNet {theirs_count:,} = ours + {theirs_count - ours_count:,}"
    f" (torch's nn.LSTM keeps bias_ih and bias_hh, always summed: {redundant:,} redundant); "
    f"without it {'equal' if theirs_count - redundant == ours_count else 'NOT EQUAL'}",
    flush=True,
  )
  del theirs_head

  results = {}
  if "image" in paths:
    ours = ours32.participant("image fp32", image_batch)
    theirs = [
      peer.image_participant(f"image fp32 {layout}", images, score, layout) for layout in layouts
    ]
    alternate([ours, *theirs])
    report(
      f"image path: encoder + head train step, fp32, {size} px, batch {batch}",
      [ours, *theirs],
      peaks,
    )
    for t in theirs:
      judged = " (judged: the authors' code as published)" if t.name.endswith("nchw") else ""
      print(ratio_line("image" + judged, ours, t), flush=True)
    results["image"] = (ours, theirs)

  if "cache" in paths:
    ours = ours32.participant(f"cache ({FLAGS.cache_dtype} features) fp32", feature_batch)
    theirs = peer.image_participant(f"image fp32 {layouts[0]}", images, score, layouts[0])
    head = peer.head_participant("head from fp32 features", features_fp32, score)
    alternate([ours, theirs, head])
    report(
      f"cache path: our head from cached {grid}x{grid}x1024 {FLAGS.cache_dtype} features; "
      "torch has no cache",
      [ours, theirs, head],
      peaks,
    )
    print(ratio_line("cache vs the torch image path (judged)", ours, theirs), flush=True)
    print(ratio_line("cache vs torch's head alone (extra)", ours, head), flush=True)
    results["cache"] = (ours, [theirs, head])

  if "bf16" in paths:
    ours16 = Ours(half_precision=True)
    ours_image = ours16.participant("image bf16", image_batch, "bfloat16")
    ours_cache = ours16.participant(
      f"cache ({FLAGS.cache_dtype} features) bf16", feature_batch, "bfloat16"
    )
    theirs = [
      peer.image_participant(f"image autocast bf16 {layout}", images, score, layout, torch.bfloat16)
      for layout in layouts
    ]
    alternate([ours_image, ours_cache, *theirs])
    report(
      f"bf16 path: ours half_precision=True, torch autocast(cpu, bfloat16), batch {batch}",
      [ours_image, ours_cache, *theirs],
      peaks,
    )
    for t in theirs:
      print(ratio_line("bf16 image", ours_image, t), flush=True)
      print(ratio_line("bf16 cache vs torch bf16 image", ours_cache, t), flush=True)
    # Which precision is faster, per framework (medians; fp32 from its own alternation above).
    fp32 = {}
    if "image" in results:
      fp32["ours image"] = results["image"][0]
      for t in results["image"][1]:
        fp32[f"torch {t.name.split()[-1]}"] = t
    if "cache" in results:
      fp32["ours cache"] = results["cache"][0]
    pairs = [("ours image", ours_image), ("ours cache", ours_cache)]
    pairs += [(f"torch {t.name.split()[-1]}", t) for t in theirs]
    for key, bf16 in pairs:
      if key in fp32:
        speedup = bf16.median() / fp32[key].median()
        faster = "bf16 faster" if speedup > 1 else "fp32 faster"
        print(f"{key}: bf16/fp32 median {speedup:.2f}x: {faster}", flush=True)
    results["bf16"] = ([ours_image, ours_cache], theirs)

  judged = []
  if "image" in results:
    ours, theirs = results["image"]
    judged.append(f"image {ours.median() / theirs[0].median():.2f}x (vs torch {theirs[0].name})")
  if "cache" in results:
    ours, theirs = results["cache"]
    judged.append(f"cache {ours.median() / theirs[0].median():.2f}x (vs torch {theirs[0].name})")
  if judged:
    print(f"\nsummary, ours/torch median/median: {'; '.join(judged)}", flush=True)

  # Torch's FLOPs as its own counter sees them (convs and matmuls only), after the timing.
  if "image" in results:
    counted = peer.counted_flops(results["image"][1][0])
    if counted:
      print(
        f"torch's FlopCounterMode: {counted / 1e9:.2f} GFLOP/img for its image train step "
        "(convs and matmuls; XLA's count above includes elementwise ops)",
        flush=True,
      )


if __name__ == "__main__":
  app.run(main)
