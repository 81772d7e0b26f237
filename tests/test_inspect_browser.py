"""``masktrain inspect``'s page in a real headless browser (Debian's Chromium, which the README's
test command installs when it runs as root): every overlay the page shows loads and has pixels, and
a missing one is seen as missing. Without Chromium the test skips, saying why; the check that every
file the page references exists runs always (``test_inspect.py``)."""

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import cached
from masktrain.config.inspect import InspectConfig
from masktrain.inspect.page import run

CHROMIUM = next(
    (shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)),
    None,
)

# A page that loads the inspect page in a frame (file:// pages may read each other with
# --allow-file-access-from-files) and records what the browser made of its images.
PROBE = """<!doctype html><html><body><iframe id="page" src="{page}" width="1200" height="2000"></iframe>
<script>
document.getElementById("page").addEventListener("load", () => {{
  const doc = document.getElementById("page").contentDocument;
  const images = Array.from(doc.images);
  document.body.setAttribute("data-result", JSON.stringify({{
    images: images.length,
    loaded: images.filter(i => i.complete && i.naturalWidth > 0).length,
    figures: doc.querySelectorAll("figure").length,
  }}));
}});
</script></body></html>
"""


def _render(page: Path, tmp_path: Path) -> dict[str, int]:
    probe = tmp_path / "probe.html"
    probe.write_text(PROBE.format(page=page.resolve().as_uri()))
    command = [
        CHROMIUM,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--allow-file-access-from-files",
        "--virtual-time-budget=10000",
        "--dump-dom",
        probe.resolve().as_uri(),
    ]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
    match = re.search(r'data-result="([^"]*)"', dom)
    assert match is not None, dom[-2000:]
    return json.loads(html.unescape(match[1]))


@pytest.mark.slow
def test_the_page_renders_every_overlay_in_a_headless_browser(tmp_path: Path) -> None:
    if CHROMIUM is None:
        message = "no chromium on this machine: the README's test command installs it when run as root"
        print(message)
        pytest.skip(message)
    toml = cached(tmp_path / "data", "wan")
    out = tmp_path / "inspect"
    run(InspectConfig(toml, output_dir=out))
    assert _render(out / "index.html", tmp_path) == {"images": 4, "loaded": 4, "figures": 4}
    next((out / "overlays").iterdir()).unlink()  # the check sees a missing picture
    assert _render(out / "index.html", tmp_path)["loaded"] == 3
