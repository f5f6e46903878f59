"""Headless Chromium driven by Selenium: the OHIF page, its viewport state and screenshots."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tools.ohif_proof.common import CHROMEDRIVER, CHROMIUM, OHIF_BASE, WINDOW, ImageU8, log, wait_until
from tools.ohif_proof.images import load_png


def start_chromium(profile: Path, window: tuple[int, int] = WINDOW) -> Any:
    """Headless Debian Chromium under Selenium with a fresh profile (no network beyond 127.0.0.1)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                "--disable-dev-shm-usage", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                f"--window-size={window[0]},{window[1]}", "--force-device-scale-factor=1",
                f"--user-data-dir={profile}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=CHROMEDRIVER, log_output=str(profile.parent / "chromedriver.log"))
    driver = webdriver.Chrome(options=opts, service=service)
    driver.set_page_load_timeout(120)
    driver.set_script_timeout(60)
    return driver


VIEWPORT_STATE_JS = """
const cs = window.cornerstone;
if (!cs || !cs.getRenderingEngines) { return null; }
let vp = null;
for (const engine of cs.getRenderingEngines()) {
  for (const v of engine.getViewports()) {
    if (v.element && v.element.isConnected && v.element.offsetWidth > 0) { vp = v; }
  }
}
if (!vp || !vp.getImageData) { return null; }
const data = vp.getImageData();
if (!data || !data.imageData) { return null; }
const dims = data.dimensions;
const rect = vp.canvas.getBoundingClientRect();
const k = vp.getCurrentImageIdIndex ? 0 : Math.floor(dims[2] / 2);
const c0 = vp.worldToCanvas(data.imageData.indexToWorld([0, 0, k]));
const c1 = vp.worldToCanvas(data.imageData.indexToWorld([dims[0] - 1, dims[1] - 1, k]));
return {
  type: String(vp.type),
  imageId: vp.getCurrentImageId ? vp.getCurrentImageId() : null,
  index: vp.getCurrentImageIdIndex ? vp.getCurrentImageIdIndex() : null,
  count: vp.getImageIds ? vp.getImageIds().length : null,
  canvas: [rect.left, rect.top, rect.width, rect.height],
  dims: [dims[0], dims[1], dims[2]],
  c0: [c0[0], c0[1]], c1: [c1[0], c1[1]],
};
"""


@dataclass(frozen=True)
class ViewportState:
    """What the active cornerstone viewport shows (read from the page, in CSS pixels)."""

    type: str
    sop_uid: str
    index: int
    count: int
    #: the displayed image's rectangle on the page: left, top, right, bottom (pixel edges)
    image_box: tuple[float, float, float, float]
    columns: int
    rows: int

    @classmethod
    def from_js(cls, raw: dict[str, Any]) -> ViewportState:
        """Parse :data:`VIEWPORT_STATE_JS`'s answer."""
        left, top = float(raw["canvas"][0]), float(raw["canvas"][1])
        cols, rows = int(raw["dims"][0]), int(raw["dims"][1])
        (x0, y0), (x1, y1) = raw["c0"], raw["c1"]
        sx = (float(x1) - float(x0)) / max(cols - 1, 1)
        sy = (float(y1) - float(y0)) / max(rows - 1, 1)
        box = (left + float(x0) - sx / 2, top + float(y0) - sy / 2,
               left + float(x1) + sx / 2, top + float(y1) + sy / 2)
        image_id = str(raw.get("imageId") or "")
        sop = ""
        if "/instances/" in image_id:
            sop = image_id.split("/instances/", 1)[1].split("/", 1)[0]
        return cls(str(raw["type"]), sop, int(raw.get("index") or 0), int(raw.get("count") or 0),
                   box, cols, rows)

    def crop(self, page: ImageU8) -> ImageU8:
        """The displayed image's rectangle out of a page screenshot."""
        left, top, right, bottom = (round(v) for v in self.image_box)
        return page[max(top, 0): bottom, max(left, 0): right]


class OhifPage:
    """OHIF in a Selenium-driven Chromium: open a study, load a SEG, step through slices."""

    def __init__(self, driver: Any, base_url: str) -> None:
        self.driver = driver
        self.base_url = base_url
        #: every browser console entry read so far (Chromium's log buffer empties on each read)
        self.console: list[dict[str, Any]] = []

    def read_console(self) -> list[dict[str, Any]]:
        """Console entries since the last call (also kept in :attr:`console`)."""
        new = [dict(e) for e in self.driver.get_log("browser")]
        self.console.extend(new)
        return new

    def open_study(self, study_uid: str, timeout: float = 120.0) -> None:
        """Open the viewer on ``study_uid`` and wait for the first rendered image."""
        self.driver.get(f"{self.base_url}{OHIF_BASE}/viewer?StudyInstanceUIDs={study_uid}")
        wait_until(self.state, timeout, "OHIF's first viewport image")
        self.dismiss_tour()

    def dismiss_tour(self) -> None:
        """Close OHIF's first-visit tour ("Skip all") if it is shown."""
        from selenium.webdriver.common.by import By

        time.sleep(1.0)
        for button in self.driver.find_elements(By.XPATH, "//*[normalize-space(text())='Skip all']"):
            with contextlib.suppress(Exception):
                button.click()

    def state(self) -> ViewportState | None:
        """The active viewport's state, or ``None`` while nothing is rendered."""
        raw = self.driver.execute_script(VIEWPORT_STATE_JS)
        return ViewportState.from_js(raw) if raw else None

    def body_text(self) -> str:
        """The page's visible text (for reports)."""
        return str(self.driver.execute_script("return document.body.innerText"))

    def double_click_series(self, description: str, timeout: float = 30.0) -> None:
        """Double-click the study browser entry whose text contains ``description``."""
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.by import By

        def find() -> Any:
            xpath = f"//*[contains(normalize-space(text()), {json.dumps(description)})]"
            found = [e for e in self.driver.find_elements(By.XPATH, xpath) if e.is_displayed()]
            return found[0] if found else None

        element = wait_until(find, timeout, f"study browser entry {description!r}")
        ActionChains(self.driver).double_click(element).perform()

    def load_seg(self, description: str, timeout: float = 90.0) -> None:
        """Load a SEG into the viewport: double-click its entry, answer "Yes", wait for hydration."""
        from selenium.webdriver.common.by import By

        self.double_click_series(description)

        def yes_button() -> Any:
            found = [b for b in self.driver.find_elements(By.XPATH, "//button[normalize-space(.)='Yes']")
                     if b.is_displayed()]
            return found[0] if found else None

        t0 = time.monotonic()
        wait_until(yes_button, timeout, "OHIF's 'open this Segmentation?' prompt").click()
        log.info("SEG prompt answered after %.1f s", time.monotonic() - t0)
        js = ("const s = window.services && window.services.segmentationService;"
              "return s ? s.getSegmentations().length : 0;")
        wait_until(lambda: self.driver.execute_script(js), timeout, "the SEG to be hydrated")
        log.info("SEG hydrated after %.1f s", time.monotonic() - t0)
        self.settle()

    def segmentations(self) -> list[dict[str, Any]]:
        """Segmentations OHIF holds: label and segments (label, colour) as OHIF sees them."""
        js = """
const s = window.services.segmentationService;
return s.getSegmentations().map(seg => ({
  id: seg.segmentationId, label: seg.label,
  segments: Object.values(seg.segments || {}).filter(x => x).map(x => ({
    index: x.segmentIndex, label: x.label,
    color: (s.getSegmentColor && window.services.viewportGridService.getActiveViewportId)
      ? s.getSegmentColor(window.services.viewportGridService.getActiveViewportId(),
                          seg.segmentationId, x.segmentIndex) : null,
  })),
}));
"""
        return list(self.driver.execute_script(js))

    def press(self, key: str, times: int = 1) -> None:
        """Press a key (Selenium ``Keys`` value) ``times`` times on the page."""
        from selenium.webdriver.common.action_chains import ActionChains

        if times > 0:
            ActionChains(self.driver).send_keys(key * times).perform()

    def go_to_index(self, index: int, timeout: float = 60.0) -> ViewportState:
        """Step to image ``index`` with the keyboard: Up/Down from the current image, or Home/End
        first when an end of the stack is nearer (every step renders, which is slow on a CPU)."""
        from selenium.webdriver.common.keys import Keys

        t0 = time.monotonic()
        state = wait_until(self.state, timeout, "a viewport image")
        current, last = state.index, max(state.count - 1, 0)
        options = [(abs(index - current), current), (index, 0), (last - index, last)]
        _, start = min(options)
        if start != current:
            self.press(Keys.HOME if start == 0 else Keys.END)
            wait_until(lambda: (st := self.state()) and st.index == start, timeout, f"image {start}")
        if index != start:
            self.press(Keys.ARROW_DOWN if index > start else Keys.ARROW_UP, abs(index - start))
        wait_until(lambda: (st := self.state()) and st.index == index, timeout, f"image index {index}")
        log.info("stepped to image %d in %.1f s", index, time.monotonic() - t0)
        return self.settle()

    def close_cine(self) -> bool:
        """Close the cine player OHIF opens for OT/US series (what its X button does)."""
        js = ("const c = window.services && window.services.cineService;"
              "if (!c || !c.getState().isCineEnabled) { return false; }"
              "c.setIsCineEnabled(false); return true;")
        closed = bool(self.driver.execute_script(js))
        if closed:
            time.sleep(0.5)
        return closed

    def settle(self, timeout: float = 45.0) -> ViewportState:
        """Wait until the viewport's pixels stop changing (rendering finished); return the state."""
        t0 = time.monotonic()
        previous: ImageU8 | None = None
        while time.monotonic() - t0 < timeout:
            time.sleep(0.3)
            state = self.state()
            if state is None:
                continue
            current = state.crop(self.page_pixels())
            if previous is not None and previous.shape == current.shape and \
                    np.array_equal(previous, current):
                log.info("viewport settled on image %d in %.1f s", state.index, time.monotonic() - t0)
                return state
            previous = current
        state = self.state()
        if state is None:
            raise RuntimeError("viewport lost its image")
        log.warning("viewport still changing after %.0f s (image %d)", timeout, state.index)
        return state

    def page_pixels(self) -> ImageU8:
        """A page screenshot as an array (not saved)."""
        import io

        from PIL import Image

        with Image.open(io.BytesIO(self.driver.get_screenshot_as_png())) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)

    def screenshot(self, path: Path) -> ImageU8:
        """Save a page screenshot as PNG and return it as an array."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.driver.get_screenshot_as_png())
        return load_png(path)

    @staticmethod
    def errors(entries: Sequence[dict[str, Any]]) -> list[str]:
        """SEVERE console messages among ``entries``, and OHIF's error boundaries (favicons dropped)."""
        out = []
        for entry in entries:
            msg = str(entry.get("message", ""))
            if "/assets/" in msg and "Failed to load resource" in msg:
                continue
            if entry.get("level") == "SEVERE" or "Error Boundary" in msg:
                out.append(msg[:400])
        return out
