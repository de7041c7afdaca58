"""Seconds from launching `run.py` to its first train step, with each log line's time.

  python -m benchmarks.first_step_benchmark                  # the demo, 3 launches
  python -m benchmarks.first_step_benchmark --runs=5 -- --config=configs/demo.py:privnet

Each launch trains the demo (or the config after `--`) in a new temporary workdir with
`--config.log_every_steps=1` (logging does not change the compiled steps, so a warm compilation
cache serves them) and is stopped once step 1 is logged. Run the demo once before: the figure is
the start-up of a second run, with the data, the feature cache and the compiled steps on disk.
Prints every log line stamped with the seconds since launch, then the time to step 1 of each run.
"""

import argparse
import pathlib
import re
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent


def time_to_first_step(run_args: list[str], echo: bool) -> float:
  with tempfile.TemporaryDirectory(prefix="first_step_") as workdir:
    command = [sys.executable, "-u", "run.py", *run_args, f"--workdir={workdir}/run"]
    command += ["--config.log_every_steps=1", "--alsologtostderr"]  # Overrides after --config.
    start = time.time()
    process = subprocess.Popen(
      command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    tail = []
    try:
      for line in process.stdout:
        tail = (tail + [line])[-20:]
        elapsed = time.time() - start
        if echo and re.match(r"[IWE]\d{4} ", line):
          print(f"{elapsed:6.2f} {line.rstrip()[:160]}", flush=True)
        if re.search(r"\] step 1/", line):
          return elapsed
    finally:
      process.kill()
      process.wait()
  raise RuntimeError(f"{' '.join(command)} ended before logging step 1:\n{''.join(tail)}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", type=int, default=3)
  parser.add_argument("run_args", nargs="*", default=["--config=configs/demo.py"])
  args = parser.parse_args()
  seconds = [time_to_first_step(args.run_args, echo=run == 0) for run in range(args.runs)]
  print("seconds to step 1:", ", ".join(f"{s:.2f}" for s in seconds))


if __name__ == "__main__":
  main()
