"""Render a report to HTML and check it in a real headless Chromium: every image loads, the page is not blank.

    python bench/report_browser_check.py [RUN_DIR ...] [--out DIR] [--chromium PATH]

Without run directories it writes three synthetic runs that carry every optional ``result.json`` key
(two bank runs over two orders with router confusion and per-example hits, one seq-lora run), so
every figure of the report is drawn. Then, with ``OUT/report.html`` written by ``write_report``:

1. every ``<img>`` of the page is a ``data:image/png`` URI whose PNG decodes fully (Pillow) and is
   not one flat colour, and the same PNG is in ``report_figures/`` under its ``data-name``;
2. Chromium loads a copy of the page with a small script appended that, on ``load``, records every
   image that is not ``complete`` with ``naturalWidth > 0`` (``--dump-dom``): none may be broken;
3. Chromium screenshots the page (``--window-size=1280,4000``) to ``OUT/screenshot.png``; the
   screenshot must decode and have at least 5% non-white pixels (a page that failed to render is white).

Exits 1 naming the failed check, 2 when Chromium is missing (``apt-get install -y chromium``).
"""

from __future__ import annotations

import argparse
import base64
import html
import html.parser
import io
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from adaptbank.report.build import write_report  # noqa: E402

TASKS = ["dbpedia", "amazon", "yelp", "yahoo", "ag_news"]
CHECK_SCRIPT = """<script>window.addEventListener("load", () => {
  const broken = [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.dataset.name || i.src.slice(0, 60));
  document.body.setAttribute("data-image-check", JSON.stringify({n: document.images.length, broken}));
});</script>"""


def synthetic_run(name: str, strategy: str, order: list[str], seed: int, routed: bool) -> dict[str, Any]:
    """A plausible finished run: diagonal ~0.9, old tasks decay for sequential strategies."""
    rng = random.Random(seed)
    skill = {t: 0.75 + 0.2 * rng.random() for t in order}
    decay = 0.02 if strategy == "bank" else 0.15
    matrix = [[round(max(0.0, skill[t] - decay * (i - j)), 3) if j <= i else round(0.1 + 0.1 * rng.random(), 3)
               for j, t in enumerate(order)] for i in range(len(order))]  # fmt: skip
    baseline = [round(0.1 + 0.1 * rng.random(), 3) for _ in order]
    hits = {t: [int(rng.random() < matrix[-1][j]) for _ in range(100)] for j, t in enumerate(order)}
    run: dict[str, Any] = {
        "schema": 1, "name": name, "strategy": strategy, "tasks": order, "seed": 0,
        "backbone": "sentence-transformers/all-MiniLM-L6-v2", "config": {"epochs": 2}, "config_changed": {},
        "oracle": {"baseline": baseline, "matrix": matrix}, "routed": None, "finished": True,
        "notes": ["synthetic run written by bench/report_browser_check.py"], "metric": "accuracy",
        "steps": [{"task": t, "router_accuracy": 0.97 if routed else None, "trainable_params": 73_000 * (i + 1),
                   "bank_bytes": 300_000 * (i + 1), "seconds": 120.0 + 10 * i, "peak_memory_bytes": (900 + 20 * i) * 2**20,
                   "train_steps": 126} for i, t in enumerate(order)],
        "hits": {"oracle": hits, "routed": None},
    }  # fmt: skip
    if routed:
        run["routed"] = {"baseline": None, "matrix": [[None if v is None or j > i else round(v * 0.97, 3)
                                                       for j, v in enumerate(row)] for i, row in enumerate(matrix)]}
        run["hits"]["routed"] = {t: [h if rng.random() > 0.05 else 0 for h in v] for t, v in hits.items()}
        k = len(order)
        run["router_confusion"] = {"tasks": order, "counts": [[95 if a == b else (5 if b == (a + 1) % k else 0)
                                                              for b in range(k)] for a in range(k)]}  # fmt: skip
    return run


class _Images(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.images.append(dict(attrs))


def check_png(data: bytes, what: str) -> tuple[int, int]:
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()  # decodes every byte: a truncated PNG raises here
    lo, hi = img.convert("L").getextrema()
    if hi - lo <= 50:
        raise SystemExit(f"FAIL {what}: the image is one flat colour (grey levels {lo}..{hi})")
    return img.size


def _chromium(exe: str, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=10000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="*", help="run directories (default: three synthetic runs)")
    ap.add_argument("--out", default="/tmp/adaptbank-report-check", help="output folder (replaced)")
    ap.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "")
    args = ap.parse_args(argv)
    if not args.chromium:
        print("chromium not found: apt-get install -y chromium (Debian) or pass --chromium PATH", file=sys.stderr)
        return 2
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    runs = [Path(r) for r in args.runs]
    if not runs:
        orders = {"o1": TASKS, "o3": ["yahoo", "amazon", "yelp", "ag_news", "dbpedia"]}
        specs = [("bank-o1", "bank", orders["o1"], 0, True), ("bank-o3", "bank", orders["o3"], 1, True),
                 ("seq-lora-o1", "seq-lora", orders["o1"], 2, False)]  # fmt: skip
        for name, strategy, order, seed, routed in specs:
            (out / "runs" / name).mkdir(parents=True)
            run = synthetic_run(name, strategy, order, seed, routed)
            (out / "runs" / name / "result.json").write_text(json.dumps(run, indent=1), encoding="utf-8")
            runs.append(out / "runs" / name)
    page_file = out / "report.html"
    page = write_report(runs, "html", page_file)

    # 1. every <img> is a decodable, non-blank PNG, written beside the page too
    parser = _Images()
    parser.feed(page)
    if not parser.images:
        raise SystemExit("FAIL the page has no <img>")
    prefix = "data:image/png;base64,"
    for img in parser.images:
        src, name = img.get("src") or "", img.get("data-name") or "?"
        if not src.startswith(prefix):
            raise SystemExit(f"FAIL <img data-name={name}>: src is not a PNG data URI: {src[:60]!r}")
        data = base64.b64decode(src[len(prefix):], validate=True)
        w, h = check_png(data, f"<img data-name={name}>")
        if (out / "report_figures" / name).read_bytes() != data:
            raise SystemExit(f"FAIL report_figures/{name} differs from the image in the page")
        print(f"ok  {name}: {w}x{h} PNG, {len(data):,} bytes")

    # 2. Chromium loads every image
    probe = out / "report_probe.html"
    probe.write_text(page.replace("</body>", CHECK_SCRIPT + "</body>"), encoding="utf-8")
    dom = _chromium(args.chromium, "--dump-dom", probe.as_uri())
    start = dom.stdout.find('data-image-check="')
    if dom.returncode != 0 or start < 0:
        raise SystemExit(f"FAIL chromium --dump-dom (rc {dom.returncode}) gave no image check:\n{dom.stderr[-2000:]}")
    value = dom.stdout[start + len('data-image-check="'):dom.stdout.index('"', start + len('data-image-check="'))]
    check = json.loads(html.unescape(value))
    if check["n"] != len(parser.images) or check["broken"]:
        raise SystemExit(f"FAIL in Chromium: {check['n']} images seen (page has {len(parser.images)}), broken: {check['broken']}")
    print(f"ok  chromium loaded all {check['n']} images")

    # 3. a screenshot that is not blank
    shot = out / "screenshot.png"
    res = _chromium(args.chromium, f"--screenshot={shot}", "--window-size=1280,4000", page_file.as_uri())
    if res.returncode != 0 or not shot.is_file():
        raise SystemExit(f"FAIL chromium --screenshot (rc {res.returncode}):\n{res.stderr[-2000:]}")
    from PIL import Image

    gray = Image.open(shot).convert("L")
    ink = sum(gray.histogram()[:240]) / (gray.width * gray.height)
    if ink < 0.05:
        raise SystemExit(f"FAIL screenshot {shot} is {100 * (1 - ink):.1f}% white: the page did not render")
    print(f"ok  screenshot {shot}: {gray.width}x{gray.height}, {100 * ink:.1f}% non-white pixels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
