"""Peak memory of ``adaptbank predict --input`` as the input grows (issue 15, item 5): bounded, not linear.

A bank on the bundled MiniLM gets two built-in tasks (weather, intent; 200 training examples, 1 epoch),
then ``adaptbank predict BANK --input FILE --json`` (routed) runs, each in a fresh process, on JSONL files
of 1,000, 10,000 and 100,000 lines (built-in-style sentences, cycled). For each size the script prints
the child's peak resident set (``os.wait4``'s ``ru_maxrss`` of that process alone), its wall time, the
rows it answered, and the peak relative to the smallest input. The input is streamed in chunks of
``cli.routing_commands.PREDICT_CHUNK`` (1,024) lines, so the peak should stay flat; before streaming it
grew with the file (every text, its token ids and every prediction were held at once).

Usage::

    python bench/predict_memory.py --json bench/results/predict_memory.json
    python bench/predict_memory.py --sizes 200 2000          # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, environment, table, write_json

SENTENCES = ["it will snow tonight in the mountains", "wake me up at seven tomorrow", "sunny and warm all week",
             "play some jazz in the kitchen", "heavy rain and strong wind expected", "what is on my calendar today",
             "foggy morning on the coast", "set a timer for ten minutes"]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "adaptbank.cli", *args]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_measured(cmd: list[str]) -> tuple[float, float, int]:
    """(peak RSS MiB of that process alone, wall seconds, stdout lines) of one command."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE, env=env())
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        err = proc.stderr.read().decode() if proc.stderr else ""
        if os.waitstatus_to_exitcode(status):
            raise SystemExit(f"{' '.join(cmd)} failed: {err.strip().splitlines()[-1:]}")
        out.seek(0)
        lines = sum(1 for _ in out)
    return usage.ru_maxrss / 1024, wall, lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    p.add_argument("--json", default=None)
    args = p.parse_args()
    print(f"load average at start: {os.getloadavg()}", flush=True)
    rows, results = [], {}
    with tempfile.TemporaryDirectory(prefix="predict-memory-") as tmp:
        bank = Path(tmp) / "bank"
        for command in (cli("init", str(bank)),
                        *(cli("add-task", str(bank), t, "--max-train", "200", "--max-test", "50", "--epochs", "1")
                          for t in ("weather", "intent"))):
            subprocess.run(command, check=True, env=env(), capture_output=True)
        for n in args.sizes:
            path = Path(tmp) / f"in-{n}.jsonl"
            with path.open("w") as fh:
                for i in range(n):
                    fh.write(json.dumps({"text": f"{SENTENCES[i % len(SENTENCES)]} {i}"}) + "\n")
            peak, wall, answered = run_measured(cli("predict", str(bank), "--input", str(path), "--json"))
            if answered != n:
                raise SystemExit(f"{n} inputs but {answered} rows answered")
            results[str(n)] = {"peak_rss_mib": peak, "wall_s": wall, "rows": answered,
                               "input_mib": path.stat().st_size / 2**20}
            base = results[str(args.sizes[0])]["peak_rss_mib"]
            rows.append([n, results[str(n)]["input_mib"], peak, peak / base, wall, answered])
            print(f"   {n:>7} lines: peak {peak:.1f} MiB, {wall:.1f} s", flush=True)
    print(table(["input lines", "input MiB", "peak RSS MiB", "peak / smallest", "wall s", "rows answered"], rows))
    write_json(args.json, {"env": environment(2), "results": results})


if __name__ == "__main__":
    main()
