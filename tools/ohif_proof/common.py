"""What every step of the viewer proof shares: pinned versions, paths of the Debian parts it
drives, image types, port and wait helpers, and the prerequisite check."""

from __future__ import annotations

import logging
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

log = logging.getLogger("viewer_proof")

REPO = Path(__file__).resolve().parents[2]
#: The OHIF release this proof is pinned to (npm ``@ohif/app``, latest stable when written).
OHIF_VERSION = "3.13.2"
#: npm's integrity string of that tarball (checked after download).
OHIF_INTEGRITY = ("sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKx"
                  "Ffpq+jd5xXZB9E8EA==")
DEFAULT_CACHE = REPO / ".cache" / "ohif"
#: URL prefix of the viewer inside Orthanc (ServeFolders) and OHIF's router base name.
OHIF_BASE = "/ohif"
#: OHIF mode routes that must answer with index.html (ServeFolders has no SPA fallback).
OHIF_ROUTES = ("viewer", "segmentation")
SERVE_FOLDERS_PLUGIN = "/usr/share/orthanc/plugins/libServeFolders.so"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
#: Browser window; large enough that the viewport is bigger than the 512² CT.
WINDOW = (1600, 1000)

RGB = tuple[int, int, int]
ImageU8 = npt.NDArray[np.uint8]
Mask = npt.NDArray[np.bool_]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.25) -> Any:
    """Call ``check`` until it returns something truthy; TimeoutError naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as exc:
            last_exc = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}"
                       + (f" (last error: {last_exc!r})" if last_exc else ""))


def dark_inside_body(bright: Mask) -> Mask:
    """The pixels outside ``bright`` that its largest connected region encloses, after a
    two-step binary opening (specks dropped); all False when ``bright`` is empty.

    The body is that largest region with its holes filled; the lungs are dark inside it (used on
    HU slices and on screenshots alike).
    """
    from scipy import ndimage

    labels, n = ndimage.label(bright)
    if n == 0:
        return np.zeros(bright.shape, dtype=bool)
    sizes = ndimage.sum(bright, labels, index=range(1, n + 1))
    body = ndimage.binary_fill_holes(labels == (int(np.argmax(sizes)) + 1))
    return np.asarray(ndimage.binary_opening(body & ~bright, iterations=2), dtype=bool)


def missing_prerequisites() -> list[str]:
    """What this machine lacks for the viewer proof (empty when everything is there)."""
    missing = []
    for path, pkg in ((SERVE_FOLDERS_PLUGIN, "orthanc"), (DICOMWEB_PLUGIN, "orthanc-dicomweb"),
                      (CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not Path(path).exists():
            missing.append(f"{path} (apt package {pkg})")
    for exe, pkg in (("Orthanc", "orthanc"), ("npm", "npm"), ("storescu", "dcmtk")):
        if shutil.which(exe) is None:
            missing.append(f"{exe} (apt package {pkg})")
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("Python package selenium (pip install selenium)")
    try:
        import PIL  # noqa: F401
    except ImportError:
        missing.append("Python package pillow (pip install pillow)")
    return missing
