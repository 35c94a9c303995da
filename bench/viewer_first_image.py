"""Time from opening the IHE IID link to the first rendered image in OHIF, and bytes moved.

  .venv/bin/python bench/viewer_first_image.py --base http://127.0.0.1:18052 --study UID

Headless Debian Chromium driven by Playwright, fresh profile each run (cold cache), loopback
only. "First image": the viewport canvas has more than 1,000 non-black sampled pixels. Bytes:
response bodies plus headers as Chromium saw them on the wire, up to that moment and in total
after a further 10 s (OHIF keeps prefetching the rest of the series).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from playwright.sync_api import sync_playwright

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
PIXELS = """() => { const cs = [...document.querySelectorAll('canvas')].filter(c => c.width > 100);
  if (!cs.length) return 0; const c = cs[0]; const t = document.createElement('canvas');
  t.width = c.width; t.height = c.height; const x = t.getContext('2d'); x.drawImage(c, 0, 0);
  const d = x.getImageData(0, 0, t.width, t.height).data; let n = 0;
  for (let i = 0; i < d.length; i += 16) if (d[i] > 10 || d[i+1] > 10 || d[i+2] > 10) n++;
  return n; }"""


def one_run(browser, base: str, study: str) -> dict:
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    moved = {"bytes": 0, "requests": 0}

    def finished(request) -> None:
        try:
            sizes = request.sizes()
        except Exception:  # the page is closing
            return
        moved["bytes"] += sizes["responseBodySize"] + sizes["responseHeadersSize"]
        moved["requests"] += 1

    page.on("requestfinished", finished)
    start = time.perf_counter()
    page.goto(f"{base}/IHEInvokeImageDisplay?requestType=STUDY&studyUID={study}")
    first = None
    deadline = start + 120
    while time.perf_counter() < deadline:
        if page.evaluate(PIXELS) > 1000:
            first = time.perf_counter() - start
            break
        time.sleep(0.02)
    at_first = dict(moved)
    page.wait_for_timeout(10_000)  # keeps serving events, unlike time.sleep
    page.remove_listener("requestfinished", finished)
    context.close()
    return {"first_image_s": first, "bytes_to_first_image": at_first["bytes"],
            "requests_to_first_image": at_first["requests"], "bytes_after_10s": moved["bytes"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True)
    parser.add_argument("--study", required=True)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=args.chromium, args=ARGS)
        runs = [one_run(browser, args.base, args.study) for _ in range(args.runs)]
        browser.close()
    times = [r["first_image_s"] for r in runs if r["first_image_s"] is not None]
    print(json.dumps({"runs": runs, "median_first_image_s": statistics.median(times)
                      if times else None}, indent=2))


if __name__ == "__main__":
    main()
