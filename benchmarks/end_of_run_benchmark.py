"""Wall time of a short second run of the demo, from launch to exit, and where it went.

  python -m benchmarks.end_of_run_benchmark                 # the demo for 2 steps, 3 launches
  python -m benchmarks.end_of_run_benchmark --runs=1 -- --config=configs/demo.py:privnet \
      --config.num_train_steps=2

Each launch runs `run.py` (the demo for 2 steps, or the arguments after `--`) in a new temporary
workdir with `--config.log_every_steps=1` (logging does not change the compiled steps), stamps
every log line with the seconds since launch and splits the run at lines it always logs: the
imports and flags end at run.py's first line, then the data opens, the model and its train state
are initialised (and the feature cache checked), the first train step, the other steps, validation
and checkpoints, the test evaluation (restore, evaluation pass, localisation, report: its own log
line), and the process's exit. Run the demo once before: the figure is that of a second run, with
the data, the feature cache and the compiled steps on disk. Prints the first launch's log, then
each phase's median over the launches, the total wall time and the CPU time (user + sys).
"""

import argparse
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_ARGS = ["--config=configs/demo.py", "--config.num_train_steps=2"]

# (phase, the log line that ends it); a phase whose line never comes is folded into the next one.
PHASES = (
  ("imports and flags", r"\] JAX process \d+ of"),
  ("data open", r"\] .*dataset .* ready in|\] Reusing "),
  ("model init, feature cache check", r"\] (Using|Building) the feature cache|\] Training \S+ for"),
  ("frozen encoder, metric writer", r"\] Training \S+ for"),
  ("first train step", r"\] step 1/"),
  ("other train steps", r"\] step (\d+)/\1 "),
  ("validation, checkpoint saves", r"\] Trained \d+ steps in"),
  ("test evaluation and report", r"\] Evaluated step \d+ on "),
)
DETAIL_LINES = (r"\] Trained \d+ steps in", r"\] Evaluated step \d+ on ")  # Echoed: sub-phases.


def run_once(run_args: list[str], echo: bool) -> dict:
  """One launch: {phase: seconds}, plus `total` (wall), `cpu` (user + sys) and the detail lines."""
  with tempfile.TemporaryDirectory(prefix="end_of_run_") as workdir:
    command = [sys.executable, "-u", "run.py", *run_args, f"--workdir={workdir}/run"]
    command += ["--config.log_every_steps=1"]  # After --config: an override of it.
    start = time.perf_counter()
    process = subprocess.Popen(
      command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    stamps, details, tail = [], [], []
    for line in process.stdout:
      elapsed = time.perf_counter() - start
      tail = (tail + [line])[-20:]
      stamps.append((elapsed, line))
      if echo and (re.match(r"[IWE]\d{4} ", line) or " on test " in line):
        print(f"{elapsed:6.2f} {line.rstrip()[:160]}", flush=True)
      if any(re.search(pattern, line) for pattern in DETAIL_LINES):
        details.append(line.split("] ", 1)[-1].strip())
    _, status, usage = os.wait4(process.pid, 0)
    total = time.perf_counter() - start
  if os.waitstatus_to_exitcode(status) != 0:
    raise RuntimeError(f"{' '.join(command)} failed:\n{''.join(tail)}")
  result, previous = {}, 0.0
  for phase, pattern in PHASES:
    ends = [t for t, line in stamps if t >= previous and re.search(pattern, line)]
    if ends:
      result[phase], previous = ends[0] - previous, ends[0]
  result["exit"] = total - previous
  result["total"] = total
  result["cpu"] = usage.ru_utime + usage.ru_stime
  result["details"] = details
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", type=int, default=3)
  parser.add_argument("run_args", nargs="*", default=DEFAULT_ARGS)
  args = parser.parse_args()
  results = []
  for run in range(args.runs):
    load = os.getloadavg()[0]
    results.append(run_once(args.run_args, echo=run == 0))
    print(
      f"run {run + 1}: {results[-1]['total']:.2f} s wall, {results[-1]['cpu']:.2f} s CPU "
      f"(load average {load:.2f} at launch)",
      flush=True,
    )
    for line in results[-1]["details"]:
      print(f"  {line}")
  phases = [name for name, _ in PHASES if any(name in r for r in results)] + ["exit"]
  print(f"\nmedian over {len(results)} runs of `run.py {' '.join(args.run_args)}`:")
  for name in phases + ["total", "cpu"]:
    values = [r[name] for r in results if name in r]
    label = {"total": "TOTAL wall", "cpu": "CPU (user + sys)"}.get(name, name)
    print(f"  {label:34s} {statistics.median(values):6.2f} s")


if __name__ == "__main__":
  main()
