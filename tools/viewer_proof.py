"""Viewer proof: lungnode's SEG, SR and overlay series shown by a real OHIF viewer in headless Chromium.

What it does
------------
1. Fetches the prebuilt OHIF viewer (npm package ``@ohif/app``, pinned to :data:`OHIF_VERSION`, its
   ``dist/`` folder) with ``npm pack`` into the git-ignored cache ``.cache/ohif`` and prepares a copy
   served under ``/ohif/`` (the dist is built for ``/``: its public path is rewritten, the SPA routes
   ``viewer`` and ``segmentation`` become copies of ``index.html``, and ``app-config.js`` points the
   DICOMweb data source at the same origin).
2. Starts a throw-away Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``) on 127.0.0.1 whose
   ServeFolders plugin serves that folder at ``/ohif`` — viewer and DICOMweb on one origin, no CORS.
3. Puts a chest CT and its results into Orthanc: either through ``lungnode run`` (the real flow:
   storescu → node → C-STORE of SEG/SR/SC to Orthanc), or, as a harness, a SEG made here with
   highdicom from a threshold lung mask (``--source harness``).
4. Opens the study in headless Chromium (Debian ``chromium`` + ``chromium-driver``, driven by
   Selenium), loads the SEG, steps to a slice with mask content and one without using the keyboard,
   and takes screenshots of the viewport; the Secondary Capture series and the SR are opened too.
5. Analyses the screenshots with numpy: segment colours present/absent, overlay inside the lung
   region of the rendered CT.

Run ``.venv/bin/python tools/viewer_proof.py --out test-artifacts/viewer`` and look at the PNGs.
The test ``tests/viewer/test_ohif_viewer.py`` runs the same steps with assertions.
"""

from __future__ import annotations

import argparse
import base64
import colorsys
import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

log = logging.getLogger("viewer_proof")

REPO = Path(__file__).resolve().parents[1]
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


# --------------------------------------------------------------------------------------------------
# small helpers


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


# --------------------------------------------------------------------------------------------------
# OHIF: fetch the prebuilt dist and prepare it for /ohif/ on Orthanc's origin


APP_CONFIG = """/* Written by tools/viewer_proof.py: OHIF {version} on Orthanc's origin (ServeFolders). */
window.config = {{
  name: 'lungnode-viewer-proof',
  routerBasename: '{base}',
  extensions: [],
  modes: [],
  customizationService: {{}},
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  investigationalUseDialog: {{ option: 'never' }},
  maxNumRequests: {{ interaction: 100, thumbnail: 5, prefetch: 10 }},
  showErrorDetails: 'always',
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {{
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {{
        friendlyName: 'Orthanc (lungnode viewer proof)',
        name: 'orthanc',
        wadoUriRoot: window.location.origin + '/wado',
        qidoRoot: window.location.origin + '/dicom-web',
        wadoRoot: window.location.origin + '/dicom-web',
        qidoSupportsIncludeField: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        dicomUploadEnabled: false,
        singlepart: 'bulkdata,video',
        bulkDataURI: {{ enabled: true }},
        omitQuotationForMultipartRequest: true,
      }},
    }},
  ],
}};
"""



def _safe_extract(tar: tarfile.TarFile, dest: Path) -> None:
    """Extract regular files and folders only, all inside ``dest``.

    Python 3.11.4+ has ``extractall(filter="data")``; Debian 12's 3.11.2 does not, so the same rule
    (no links, devices or paths leaving ``dest``) is applied here by hand.
    """
    root = dest.resolve()
    members = []
    for member in tar.getmembers():
        target = (dest / member.name).resolve()
        if not (member.isfile() or member.isdir()) or not target.is_relative_to(root):
            raise RuntimeError(f"refusing to extract {member.name!r} from the OHIF package")
        member.mode = (member.mode | 0o600) & 0o755
        members.append(member)
    tar.extractall(dest, members=members)

def fetch_ohif(cache: Path = DEFAULT_CACHE, version: str = OHIF_VERSION) -> Path:
    """The ``dist/`` folder of ``@ohif/app@version``, fetched once with ``npm pack`` into ``cache``.

    ``npm pack`` downloads just the package tarball (the prebuilt viewer); its dependencies are build
    inputs the dist already contains. The tarball's sha512 is checked against :data:`OHIF_INTEGRITY`
    when ``version`` is the pinned one.
    """
    target = cache / f"app-{version}"
    dist = target / "package" / "dist"
    if (dist / "index.html").is_file() and (dist / "app-config.js").is_file():
        return dist
    cache.mkdir(parents=True, exist_ok=True)
    import fcntl

    with (cache / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test session may be fetching the same version
        if (dist / "index.html").is_file() and (dist / "app-config.js").is_file():
            return dist
        tarball = cache / f"ohif-app-{version}.tgz"
        if not tarball.is_file():
            log.info("npm pack @ohif/app@%s into %s", version, cache)
            subprocess.run(["npm", "pack", f"@ohif/app@{version}", "--pack-destination", str(cache)],
                           check=True, capture_output=True, cwd=cache)
        if version == OHIF_VERSION:
            digest = "sha512-" + base64.b64encode(hashlib.sha512(tarball.read_bytes()).digest()).decode()
            if digest != OHIF_INTEGRITY:
                tarball.unlink()
                raise RuntimeError(f"{tarball}: integrity {digest} is not the pinned {OHIF_INTEGRITY}")
        tmp = Path(tempfile.mkdtemp(prefix=f"app-{version}-", dir=cache))
        with tarfile.open(tarball) as tar:
            _safe_extract(tar, tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    if not (dist / "index.html").is_file():
        raise RuntimeError(f"@ohif/app@{version} has no prebuilt dist/index.html")
    return dist


def prepare_site(dist: Path, site: Path, base: str = OHIF_BASE, version: str = OHIF_VERSION) -> Path:
    """A folder that serves ``dist`` under ``base``: symlinks, plus the few rewritten files.

    - ``index.html``: ``window.PUBLIC_URL`` and absolute ``/...`` references get the ``base`` prefix;
    - every ``*.js`` with webpack's public path ``"/"`` (app and worker bundles): ``"base/"``;
    - ``*.css``: ``url(/`` becomes ``url(base/`` (fonts);
    - ``app-config.js``: :data:`APP_CONFIG` (DICOMweb at ``/dicom-web`` on the same origin);
    - ``init-service-worker.js``: emptied (no service worker caching between runs);
    - one copy of the rewritten ``index.html`` per OHIF route in :data:`OHIF_ROUTES`.
    """
    if "." in str(site):
        # ServeFolders takes the MIME type from the last "." of the whole path: the extension-less
        # route files would then be served as application/octet-stream (a download, not a page).
        raise ValueError(f"the site folder must have no '.' in its path: {site}")
    if site.exists():
        shutil.rmtree(site)
    site.mkdir(parents=True)
    prefix = base.rstrip("/") + "/"
    for entry in dist.iterdir():
        (site / entry.name).symlink_to(entry.resolve())
    index = (dist / "index.html").read_text(encoding="utf-8")
    index = index.replace('window.PUBLIC_URL="/"', f'window.PUBLIC_URL="{prefix}"')
    index = index.replace('href="/', f'href="{prefix}').replace('src="/', f'src="{prefix}')
    if f'window.PUBLIC_URL="{prefix}"' not in index:
        raise RuntimeError("OHIF index.html: window.PUBLIC_URL not found; the dist layout changed")
    needle = '__webpack_require__.p = "/";'
    rewritten: dict[str, str] = {"index.html": index}
    for script in sorted(dist.glob("*.js")):
        code = script.read_text(encoding="utf-8", errors="surrogateescape")
        if needle in code:
            rewritten[script.name] = code.replace(needle, f'__webpack_require__.p = "{prefix}";')
    if not any(name.startswith("app.bundle.") for name in rewritten):
        raise RuntimeError("OHIF app.bundle: webpack public path not found; the dist layout changed")
    for sheet in sorted(dist.glob("*.css")):
        css = sheet.read_text(encoding="utf-8", errors="surrogateescape")
        if "url(/" in css:
            rewritten[sheet.name] = css.replace("url(/", f"url({prefix}")
    rewritten["app-config.js"] = APP_CONFIG.format(version=version, base=base.rstrip("/"))
    rewritten["init-service-worker.js"] = "/* no service worker in the viewer proof */\n"
    for name, text in rewritten.items():
        (site / name).unlink()
        (site / name).write_text(text, encoding="utf-8", errors="surrogateescape")
    for route in OHIF_ROUTES:
        (site / route).write_text(index, encoding="utf-8")
    return site


# --------------------------------------------------------------------------------------------------
# Orthanc


@dataclass
class Orthanc:
    """A throw-away Orthanc on 127.0.0.1 with DICOMweb and ServeFolders (``/ohif`` → ``site``)."""

    workdir: Path
    site: Path
    http_port: int = field(default_factory=free_port)
    dicom_port: int = field(default_factory=free_port)
    aet: str = "ORTHANC"
    #: AE titles allowed to C-STORE into it: (title, port) of peers it knows (C-STORE needs none).
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Base HTTP URL."""
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 30.0) -> None:
        """Write the configuration, start Orthanc and wait until its REST API answers."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "lungnode-viewer-proof",
            "StorageDirectory": str(self.workdir / "db"),
            "IndexDirectory": str(self.workdir / "db"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "UnknownSopClassAccepted": True,
            "StorageCompression": False,
            "SyncStorageArea": False,
            "ConcurrentJobs": 1,
            "HttpThreadsCount": 20,
            "Plugins": [SERVE_FOLDERS_PLUGIN, DICOMWEB_PLUGIN],
            "ServeFolders": {"Folders": {OHIF_BASE: str(self.site)},
                             "Extensions": {".wasm": "application/wasm", ".mjs": "text/javascript",
                                            ".json": "application/json", ".css": "text/css",
                                            ".svg": "image/svg+xml", ".woff2": "font/woff2",
                                            "": "text/html"},
                             "AllowCache": False, "GenerateETag": True},
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True,
                         "WadoRoot": "/wado", "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
        }
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(json.dumps(config, indent=2), encoding="utf-8")
        env = dict(os.environ, TCP_NODELAY="1")
        logf = (self.workdir / "orthanc.log").open("wb")
        self.process = subprocess.Popen(["Orthanc", str(cfg)], stdout=logf, stderr=subprocess.STDOUT,
                                        env=env, cwd=self.workdir)
        wait_until(lambda: self.get_json("/system"), timeout, "Orthanc's REST API")

    def stop(self) -> None:
        """Stop the Orthanc started by :meth:`start`."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def get_json(self, path: str) -> Any:
        """GET ``path`` from the REST API, decoded."""
        with urllib.request.urlopen(self.url + path, timeout=30) as resp:
            return json.loads(resp.read())

    def get_bytes(self, path: str) -> bytes:
        """GET ``path`` from the REST API, raw."""
        with urllib.request.urlopen(self.url + path, timeout=60) as resp:
            return bytes(resp.read())

    def post_instance(self, data: bytes) -> dict[str, Any]:
        """Store one DICOM file (REST POST /instances)."""
        req = urllib.request.Request(self.url + "/instances", data=data, method="POST",
                                     headers={"Content-Type": "application/dicom"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            result: dict[str, Any] = json.loads(resp.read())
            return result

    def series_by_modality(self, study_uid: str) -> dict[str, list[dict[str, Any]]]:
        """The study's series in Orthanc, grouped by Modality (``MainDicomTags``)."""
        found = self.find("Series", {"StudyInstanceUID": study_uid})
        out: dict[str, list[dict[str, Any]]] = {}
        for series in found:
            out.setdefault(series["MainDicomTags"].get("Modality", ""), []).append(series)
        return out

    def find(self, level: str, query: dict[str, str]) -> list[dict[str, Any]]:
        """REST /tools/find with ``Expand``."""
        body = json.dumps({"Level": level, "Query": query, "Expand": True}).encode()
        req = urllib.request.Request(self.url + "/tools/find", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            result: list[dict[str, Any]] = json.loads(resp.read())
            return result


@contextlib.contextmanager
def running_orthanc(workdir: Path, site: Path) -> Iterator[Orthanc]:
    """Start :class:`Orthanc` for the ``with`` block."""
    server = Orthanc(workdir=workdir, site=site)
    try:
        server.start()
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------------------------------
# harness SEG (highdicom) for developing the screenshot checks without the node


#: Colours of the harness SEG (the node's own SEG carries its colours; the checks read them from it).
HARNESS_LUNG_RGB: RGB = (128, 174, 255)
HARNESS_INFILTRATE_RGB: RGB = (255, 80, 0)


def threshold_lung_mask(hu: npt.NDArray[np.floating[Any]]) -> Mask:
    """A crude lung mask of one axial slice in HU: air (< -400 HU) enclosed by the body.

    The body is the largest connected region above -400 HU with its holes filled; lungs are the air
    inside it, minus components under 1 % of the slice (airways, bowel gas).
    """
    from scipy import ndimage

    dense = hu > -400
    labels, n = ndimage.label(dense)
    if n == 0:
        return np.zeros(hu.shape, dtype=bool)
    sizes = ndimage.sum(dense, labels, index=range(1, n + 1))
    body = ndimage.binary_fill_holes(labels == (int(np.argmax(sizes)) + 1))
    air = body & ~dense
    air = ndimage.binary_opening(air, iterations=2)
    labels, n = ndimage.label(air)
    keep = np.zeros(hu.shape, dtype=bool)
    for i in range(1, n + 1):
        comp = labels == i
        if comp.sum() > 0.01 * hu.size:
            keep |= comp
    return keep


@dataclass(frozen=True)
class HarnessSeg:
    """The harness SEG and what is in it."""

    path: Path
    series_uid: str
    #: Slice indices (sorted source order, foot → head as in the series) with lung / infiltrate.
    lung_slices: tuple[int, ...]
    infiltrate_slices: tuple[int, ...]


def sorted_ct(ct_dir: Path) -> list[Any]:
    """The CT datasets of ``ct_dir`` sorted along the slice normal (ascending position)."""
    import pydicom

    datasets = [pydicom.dcmread(p) for p in sorted(ct_dir.glob("*.dcm"))]
    normal = np.cross(*np.reshape(np.asarray(datasets[0].ImageOrientationPatient, float), (2, 3)))
    return sorted(datasets, key=lambda d: float(np.dot(normal, np.asarray(d.ImagePositionPatient))))


def make_harness_seg(ct_dir: Path, out: Path, slices: range | None = None,
                     shift: int = 0) -> HarnessSeg:
    """A BINARY SEG (Lung, Infiltrate) on ``ct_dir`` made with highdicom, all frames kept.

    ``shift`` moves both masks that many columns to the right: a deliberately misplaced SEG, as a
    negative control of the screenshot checks.

    Lung: :func:`threshold_lung_mask` on ``slices`` (default: the middle half of the series), empty
    elsewhere. Infiltrate: a disc of 25 pixels radius inside the largest lung component on the
    middle third of those slices.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    datasets = sorted_ct(ct_dir)
    n = len(datasets)
    slices = slices if slices is not None else range(n // 4, n - n // 4)
    lung = np.zeros((n, int(datasets[0].Rows), int(datasets[0].Columns)), dtype=bool)
    infil = np.zeros_like(lung)
    yy, xx = np.mgrid[: lung.shape[1], : lung.shape[2]]
    inner = list(slices)[len(slices) // 3: 2 * len(slices) // 3]
    for i in slices:
        ds = datasets[i]
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        lung[i] = threshold_lung_mask(hu)
        if i in inner and lung[i].any():
            from scipy import ndimage

            dist = ndimage.distance_transform_edt(lung[i])
            cy, cx = np.unravel_index(int(np.argmax(dist)), dist.shape)
            infil[i] = ((yy - cy) ** 2 + (xx - cx) ** 2 <= 25 ** 2) & lung[i]

    if shift:
        lung = np.roll(lung, shift, axis=2)
        infil = np.roll(infil, shift, axis=2)

    def cc(code: Any) -> hd.sr.CodedConcept:
        return hd.sr.CodedConcept(code.value, code.scheme_designator, code.meaning)

    algo = hd.AlgorithmIdentificationSequence(name="viewer-proof threshold", version="1",
                                              family=cc(codes.DCM.ArtificialIntelligence))
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=1, segment_label="Lung",
            segmented_property_category=cc(codes.SCT.AnatomicalStructure),
            segmented_property_type=cc(codes.SCT.Lung),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo,
            display_color=hd.color.CIELabColor.from_rgb(*HARNESS_LUNG_RGB)),
        hd.seg.SegmentDescription(
            segment_number=2, segment_label="Infiltrate",
            segmented_property_category=cc(codes.SCT.MorphologicallyAbnormalStructure),
            segmented_property_type=cc(codes.DCM.Infiltrate),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo,
            display_color=hd.color.CIELabColor.from_rgb(*HARNESS_INFILTRATE_RGB)),
    ]
    seg = hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=np.stack([lung, infil], axis=-1).astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(), series_number=9900,
        sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="lungnode viewer proof", manufacturer_model_name="harness",
        software_versions="0", device_serial_number="0",
        series_description="HARNESS lung + infiltrate SEG",
        omit_empty_frames=False,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(out)
    return HarnessSeg(out, str(seg.SeriesInstanceUID),
                      tuple(int(i) for i in np.flatnonzero(lung.any(axis=(1, 2)))),
                      tuple(int(i) for i in np.flatnonzero(infil.any(axis=(1, 2)))))


# --------------------------------------------------------------------------------------------------
# colours in screenshots


def cielab_to_rgb(lab16: Sequence[int]) -> RGB:
    """DICOM RecommendedDisplayCIELabValue (0..65535 scaled) → sRGB 0..255."""
    import highdicom as hd

    rgb = hd.color.CIELabColor.from_dicom_value(tuple(int(v) for v in lab16)).to_rgb()
    return (int(rgb[0]), int(rgb[1]), int(rgb[2]))


def hue_deg(rgb: Sequence[float]) -> float:
    """Hue of an RGB colour in degrees."""
    h, _, _ = colorsys.rgb_to_hsv(*(float(c) / 255.0 for c in rgb))
    return h * 360.0


def colour_mask(image: ImageU8, rgb: RGB, hue_tol: float = 25.0, min_chroma: int = 40) -> Mask:
    """Pixels of ``image`` (H×W×3) that show segment colour ``rgb``, blended or not.

    OHIF draws a segment as its colour blended over the grey CT (fill) plus an opaque outline; both
    keep the colour's hue, while the CT and the UI text are grey (no chroma). A pixel counts when its
    chroma (max − min channel) is at least ``min_chroma`` and its hue is within ``hue_tol`` degrees of
    the segment colour's hue. Where two segments overlap (infiltrate inside the lung) OHIF blends
    both fills: orange (19°) over light blue comes out near 0° — hence the 25° default tolerance,
    fine for colours as far apart in hue as lungnode's (216° and 19°).
    """
    img = image[..., :3].astype(np.float32)
    mx, mn = img.max(axis=-1), img.min(axis=-1)
    chroma = mx - mn
    safe = np.where(chroma == 0, 1.0, chroma)
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    h = np.where(mx == r, ((g - b) / safe) % 6.0,
                 np.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0)) * 60.0
    diff = np.abs(((h - hue_deg(rgb)) + 180.0) % 360.0 - 180.0)
    return np.asarray((chroma >= min_chroma) & (diff <= hue_tol), dtype=bool)


def rendered_lung_region(image: ImageU8, dark: int = 60) -> Mask:
    """The lungs as rendered on a grey CT screenshot: dark pixels enclosed by the bright body.

    The body is the largest connected bright region (grey value above ``dark``) with its holes
    filled; the lungs are the dark pixels inside it (small specks dropped).
    """
    from scipy import ndimage

    grey = image[..., :3].astype(np.float32).mean(axis=-1)
    bright = grey > dark
    labels, n = ndimage.label(bright)
    if n == 0:
        return np.zeros(grey.shape, dtype=bool)
    sizes = ndimage.sum(bright, labels, index=range(1, n + 1))
    body = ndimage.binary_fill_holes(labels == (int(np.argmax(sizes)) + 1))
    lungs = body & ~bright
    lungs = ndimage.binary_opening(lungs, iterations=2)
    return np.asarray(lungs, dtype=bool)


def load_png(path: Path) -> ImageU8:
    """A PNG as an H×W×3 uint8 array."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


# --------------------------------------------------------------------------------------------------
# browser


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


# --------------------------------------------------------------------------------------------------
# ground truth from the DICOM objects in Orthanc


@dataclass(frozen=True)
class SegTruth:
    """What a SEG says, per source SOP Instance UID and segment label."""

    series_uid: str
    series_description: str
    colours: dict[str, RGB]
    #: masks[sop_uid][label] → rows×columns bool (only frames present in the SEG)
    masks: dict[str, dict[str, Mask]]

    def labels_on(self, sop_uid: str) -> set[str]:
        """Segment labels with at least one pixel on the source image ``sop_uid``."""
        return {label for label, m in self.masks.get(sop_uid, {}).items() if m.any()}


def read_seg_truth(datasets: Sequence[Any]) -> SegTruth:
    """Colours and masks of one SEG series (one or more instances)."""
    colours: dict[str, RGB] = {}
    masks: dict[str, dict[str, Mask]] = {}
    for ds in datasets:
        labels = {}
        for item in ds.SegmentSequence:
            labels[int(item.SegmentNumber)] = str(item.SegmentLabel)
            if "RecommendedDisplayCIELabValue" in item:
                colours[str(item.SegmentLabel)] = cielab_to_rgb(item.RecommendedDisplayCIELabValue)
        frames = ds.pixel_array.reshape(int(ds.NumberOfFrames), int(ds.Rows), int(ds.Columns))
        for i, fg in enumerate(ds.PerFrameFunctionalGroupsSequence):
            label = labels[int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber)]
            sop = str(fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
            masks.setdefault(sop, {})[label] = frames[i].astype(bool)
    first = datasets[0]
    return SegTruth(str(first.SeriesInstanceUID), str(first.get("SeriesDescription", "")), colours,
                    masks)


# --------------------------------------------------------------------------------------------------
# screenshot checks


def resize_mask(mask: Mask, shape: tuple[int, int]) -> Mask:
    """Nearest-neighbour resize of a 2D mask to ``shape`` (rows, columns)."""
    rows = (np.arange(shape[0]) * mask.shape[0] / shape[0]).astype(int)
    cols = (np.arange(shape[1]) * mask.shape[1] / shape[1]).astype(int)
    return np.asarray(mask[np.ix_(rows, cols)], dtype=bool)


@dataclass
class SliceCheck:
    """Measurements on one screenshot of one slice."""

    name: str
    sop_uid: str
    index: int
    screenshot: str
    expected_labels: list[str]
    colour_pixels: dict[str, int]
    #: share of each segment's coloured pixels inside the lungs of the rendered CT (if measured)
    inside_rendered_lungs: dict[str, float] = field(default_factory=dict)
    #: IoU of the coloured lung area (holes filled) and the SEG's lung mask, scaled onto the screen
    lung_iou: float | None = None
    #: mean absolute grey difference outside the overlay between this and the CT-only screenshot
    background_diff: float | None = None
    #: the displayed image on the screenshot: left, top, right, bottom (CSS pixels)
    image_box: tuple[float, float, float, float] | None = None


def colour_counts(crop: ImageU8, colours: dict[str, RGB], exclude: Mask | None = None) -> dict[str, int]:
    """Number of pixels of each segment colour in ``crop`` (``exclude`` pixels not counted)."""
    out = {}
    for label, rgb in colours.items():
        m = colour_mask(crop, rgb)
        if exclude is not None:
            m &= ~exclude
        out[label] = int(m.sum())
    return out


def analyse_seg_slice(name: str, state: ViewportState, page: ImageU8, ct_page: ImageU8 | None,
                      truth: SegTruth, shot: Path) -> SliceCheck:
    """Colour counts, overlap with the rendered lungs and with the SEG mask, for one slice."""
    from scipy import ndimage

    crop = state.crop(page)
    check = SliceCheck(name, state.sop_uid, state.index, str(shot),
                       sorted(truth.labels_on(state.sop_uid)), colour_counts(crop, truth.colours),
                       image_box=state.image_box)
    if ct_page is not None:
        ct_crop = state.crop(ct_page)
        lungs = ndimage.binary_dilation(rendered_lung_region(ct_crop), iterations=3)
        any_colour = np.zeros(crop.shape[:2], dtype=bool)
        for label, rgb in truth.colours.items():
            m = colour_mask(crop, rgb)
            any_colour |= m
            if m.sum():
                check.inside_rendered_lungs[label] = float((m & lungs).sum() / m.sum())
        outside = ~ndimage.binary_dilation(any_colour, iterations=2)
        diff = np.abs(crop.astype(np.int16) - ct_crop.astype(np.int16)).mean(axis=-1)
        check.background_diff = float(diff[outside].mean()) if outside.any() else None
    lung_label = next((lb for lb in truth.colours if lb.lower().startswith("lung")), None)
    if lung_label and state.sop_uid in truth.masks and lung_label in truth.masks[state.sop_uid]:
        expected = resize_mask(truth.masks[state.sop_uid][lung_label], crop.shape[:2])
        shown = ndimage.binary_fill_holes(colour_mask(crop, truth.colours[lung_label]))
        if expected.any() or shown.any():
            check.lung_iou = float((expected & shown).sum() / max((expected | shown).sum(), 1))
    return check


# --------------------------------------------------------------------------------------------------
# putting a study with results into Orthanc


SOURCES = ("node", "builders", "harness")


def threshold_result(files: Sequence[Path]) -> Any:
    """A real :class:`lungnode.inference.types.InferenceResult` of a CT series without the model.

    Lungs: :func:`threshold_lung_mask` per slice (right lung = image left half); infiltrate: a disc
    of 25 pixels radius around the deepest point of the right lung on the middle five lung slices.
    """
    from scipy import ndimage

    from lungnode.inference.dicom_io import read_series
    from lungnode.inference.types import (
        LUNG_LEFT,
        LUNG_RIGHT,
        InferenceResult,
        Measurements,
        ModelInfo,
        RegionMeasurement,
    )

    volume = read_series(list(files))
    lung = np.stack([threshold_lung_mask(s) for s in volume.hu])
    labels = np.zeros(lung.shape, dtype=np.uint8)
    mid = lung.shape[2] // 2
    labels[:, :, :mid][lung[:, :, :mid]] = LUNG_RIGHT
    labels[:, :, mid:][lung[:, :, mid:]] = LUNG_LEFT
    infiltrate = np.zeros(lung.shape, dtype=bool)
    with_lung = np.flatnonzero((labels == LUNG_RIGHT).any(axis=(1, 2)))
    centre = int(with_lung[len(with_lung) // 2]) if with_lung.size else 0
    yy, xx = np.mgrid[: lung.shape[1], : lung.shape[2]]
    for k in range(max(centre - 2, 0), min(centre + 3, lung.shape[0])):
        right = labels[k] == LUNG_RIGHT
        if right.any():
            dist = ndimage.distance_transform_edt(right)
            cy, cx = np.unravel_index(int(np.argmax(dist)), dist.shape)
            infiltrate[k] = ((yy - cy) ** 2 + (xx - cx) ** 2 <= 25 ** 2) & right
    v = volume.voxel_volume_ml

    def region(mask: Mask) -> Any:
        return RegionMeasurement(lung_ml=float(mask.sum() * v),
                                 infiltrate_ml=float((infiltrate & mask).sum() * v),
                                 ground_glass_ml=0.0, consolidation_ml=0.0)

    measurements = Measurements(left=region(labels == LUNG_LEFT), right=region(labels == LUNG_RIGHT),
                                both=region(labels > 0))
    return InferenceResult(volume=volume, lung_labels=labels, infiltrate=infiltrate,
                           measurements=measurements,
                           model=ModelInfo(name="viewer-proof-threshold", version="0",
                                           sha256="0" * 64))


class ThresholdEngine:
    """Stand-in inference engine for ``lungnode run`` (``jobs.engine_factory``) while no model
    bundle is available: :func:`threshold_result` on the job's files."""

    def run(self, files: Sequence[Path]) -> Any:
        """Segment the series in ``files``."""
        return threshold_result([Path(f) for f in files])


def threshold_engine(config: Any) -> ThresholdEngine:
    """``jobs.engine_factory = "viewer_proof:threshold_engine"`` (``tools/`` on PYTHONPATH)."""
    return ThresholdEngine()


#: The model bundle ``lungnode run`` uses by default.
DEMO_MODEL = REPO / "lungnode" / "models" / "lungnode-demo.safetensors"


def populate_harness(orthanc: Orthanc, ct_dir: Path, workdir: Path, shift: int = 0) -> None:
    """CT by REST plus the harness SEG (:func:`make_harness_seg`, ``shift`` columns misplaced)."""
    for path in sorted(ct_dir.glob("*.dcm")):
        orthanc.post_instance(path.read_bytes())
    seg = make_harness_seg(ct_dir, workdir / "harness-seg.dcm", shift=shift)
    orthanc.post_instance(seg.path.read_bytes())


def populate_builders(orthanc: Orthanc, ct_dir: Path) -> None:
    """CT by REST plus SEG, SR and SC from lungnode's own builders on a threshold result."""
    from lungnode.node.results.build import Profile, build_outputs
    from lungnode.node.results.common import OutputContext

    result = threshold_result(sorted(ct_dir.glob("*.dcm")))
    for path in sorted(ct_dir.glob("*.dcm")):
        orthanc.post_instance(path.read_bytes())
    outputs = build_outputs(result, OutputContext(job_id=1, model=result.model),
                            Profile(objects=("seg", "sr", "sc")))
    for out in outputs:
        orthanc.post_instance(out.data)


def populate_node(orthanc: Orthanc, ct_dir: Path, workdir: Path, engine: str = "auto",
                  destination: dict[str, Any] | None = None,
                  timeout: float = 900.0) -> tuple[str, str]:
    """The real flow: storescu → ``lungnode run`` → C-STORE of SEG, SR and SC into Orthanc.

    ``engine``: ``model`` (the node's configured model), ``threshold`` (:class:`ThresholdEngine`
    through ``jobs.engine_factory``: everything real except the segmentation), or ``auto`` (the model
    when :data:`DEMO_MODEL` exists). ``destination``: extra keys of the ``[[destinations]]`` entry
    (e.g. ``{"omit_empty_frames": True}``). Returns (engine used, the node's log). Raises TimeoutError when
    the results do not arrive.
    """
    sys.path.insert(0, str(REPO / "tests"))
    from node_process import LungnodeProcess

    n_ct = len(list(ct_dir.glob("*.dcm")))
    if engine == "auto":
        engine = "model" if DEMO_MODEL.is_file() else "threshold"
    jobs: dict[str, Any] = {"local_workers": 1, "poll_s": 0.5}
    if engine == "threshold":
        log.warning("lungnode run with the threshold stand-in engine (model bundle %s %s)",
                    DEMO_MODEL, "exists" if DEMO_MODEL.is_file() else "is missing")
        jobs["engine_factory"] = "viewer_proof:threshold_engine"
    old_pythonpath = os.environ.get("PYTHONPATH")
    if engine == "threshold":  # the node and its workers import viewer_proof from tools/
        paths = [str(REPO / "tools"), *filter(None, (old_pythonpath or "").split(":"))]
        os.environ["PYTHONPATH"] = ":".join(dict.fromkeys(paths))
    overrides = {
        "completion": {"quiet_period_s": 5.0, "grace_s": 1.0},
        "jobs": jobs,
        "delivery": {"retry_delays_s": [2.0, 5.0, 10.0], "timeout_s": 30.0, "poll_s": 0.5},
        "destinations": [{"name": "orthanc", "ae_title": orthanc.aet, "host": "127.0.0.1",
                          "port": orthanc.dicom_port, "objects": ["seg", "sr", "sc"],
                          **(destination or {})}],
    }
    if engine == "threshold":  # the stand-in's masks are not meant to pass the gate's plausibility
        overrides["results"] = {"quality_gate": {"enabled": False}}
    else:  # the phantom-trained demo model puts about 22 % of its infiltrate on this real CT just
        # outside the lungs (mediastinum, hila), which the default gate (20 %) holds back
        overrides["results"] = {"quality_gate": {"max_outside_fraction": 0.5}}
    node = LungnodeProcess(workdir / "node", overrides)
    try:
        node.start()
    finally:  # the environment of the calling process is left as it was
        if old_pythonpath is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_pythonpath
    try:
        env = dict(os.environ, TCP_NODELAY="1")
        subprocess.run(["storescu", "-aet", "STORESCU", "-aec", "LUNGNODE", "127.0.0.1",
                        str(node.port), *[str(p) for p in sorted(ct_dir.glob("*.dcm"))]],
                       check=True, capture_output=True, env=env, timeout=120)

        def arrived() -> bool:
            series = orthanc.find("Series", {})
            mods = {str(x["MainDicomTags"].get("Modality")): len(x["Instances"]) for x in series}
            others = [count for mod, count in mods.items() if mod not in ("CT", "SEG", "SR")]
            return "SEG" in mods and "SR" in mods and bool(others) and max(others) >= n_ct

        try:
            wait_until(arrived, timeout, "SEG, SR and SC from lungnode in Orthanc", interval=2.0)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n--- lungnode log (tail) ---\n{node.log()[-4000:]}") from exc
        # the CT itself is what the radiologist has in the PACS already: add it by REST
        for path in sorted(ct_dir.glob("*.dcm")):
            orthanc.post_instance(path.read_bytes())
        return engine, node.log()
    finally:
        node.stop()


# --------------------------------------------------------------------------------------------------
# the proof


@dataclass
class ProofReport:
    """Everything measured, and where the pictures are."""

    source: str
    out_dir: str
    engine: str = ""
    destination: dict[str, Any] = field(default_factory=dict)
    ohif_version: str = OHIF_VERSION
    study_uid: str = ""
    seg_slices: list[SliceCheck] = field(default_factory=list)
    sc_slices: list[SliceCheck] = field(default_factory=list)
    sc_series_count: int | None = None
    sc_shown_count: int | None = None
    sr: dict[str, Any] = field(default_factory=dict)
    ohif_segmentations: list[dict[str, Any]] = field(default_factory=list)
    browser_errors: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        """The report as JSON."""
        import dataclasses

        return json.dumps(dataclasses.asdict(self), indent=2)


def instances_of(orthanc: Orthanc, series: dict[str, Any]) -> list[Any]:
    """The series' instances, downloaded and parsed."""
    import io

    import pydicom

    return [pydicom.dcmread(io.BytesIO(orthanc.get_bytes(f"/instances/{iid}/file")))
            for iid in series["Instances"]]


def pick_slices(truth: SegTruth, sops: Sequence[str]) -> tuple[int, int]:
    """Viewer indices of a slice with the most segment content (both labels preferred) and of an
    empty slice (no segment), nearest to the content so both show the chest."""
    scored = []
    for i, sop in enumerate(sops):
        labels = truth.labels_on(sop)
        area = sum(int(m.sum()) for m in truth.masks.get(sop, {}).values())
        scored.append((len(labels), area, i))
    full = max(scored)
    empties = [i for n, _, i in scored if n == 0]
    if full[0] == 0 or not empties:
        raise RuntimeError("the SEG needs a slice with content and one without for this proof")
    empty = min(empties, key=lambda i: abs(i - full[2]))
    return full[2], empty


SR_TEXT_LIMIT = 3000
#: What OHIF made of the SR (its display set as the DICOM SR extension built it).
SR_DISPLAY_SETS_JS = """
const dss = window.services.displaySetService.getActiveDisplaySets();
return dss.filter(d => d.Modality === 'SR').map(d => ({
  SOPClassHandlerId: String(d.SOPClassHandlerId || ''),
  SeriesDescription: String(d.SeriesDescription || ''),
  isLoaded: !!d.isLoaded, isRehydratable: !!d.isRehydratable, isHydrated: !!d.isHydrated,
  unsupported: !!d.unsupported,
  measurements: Array.isArray(d.measurements) ? d.measurements.length : null,
  referencedImages: Array.isArray(d.referencedImages) ? d.referencedImages.length : null,
}));
"""


def run_proof(out_dir: Path, source: str = "node", ct_dir: Path | None = None,
              cache: Path = DEFAULT_CACHE, keep_open: float = 0.0, engine: str = "auto",
              destination: dict[str, Any] | None = None, harness_shift: int = 0) -> ProofReport:
    """Run the whole proof; screenshots and ``report.json`` go to ``out_dir``.

    ``source`` is one of :data:`SOURCES`; ``engine`` and ``destination`` apply to ``node`` (see
    :func:`populate_node`), ``harness_shift`` to ``harness`` (see :func:`make_harness_seg`).
    """
    ct_dir = ct_dir or REPO.parent / "shared" / "data" / "ct" / "chest-30-slices-uncompressed"
    missing = missing_prerequisites()
    if missing:
        raise RuntimeError("missing: " + "; ".join(missing))
    out_dir.mkdir(parents=True, exist_ok=True)
    report = ProofReport(source=source, out_dir=str(out_dir), destination=dict(destination or {}))
    t_start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="viewerproof", dir="/tmp"))
    try:
        dist = fetch_ohif(cache)
        site = prepare_site(dist, work / "site")
        report.seconds["ohif_ready"] = time.monotonic() - t_start
        with running_orthanc(work / "orthanc", site) as orthanc:
            t0 = time.monotonic()
            if source == "harness":
                populate_harness(orthanc, ct_dir, work, harness_shift)
            elif source == "builders":
                populate_builders(orthanc, ct_dir)
            elif source == "node":
                report.engine, log_text = populate_node(orthanc, ct_dir, work, engine,
                                                        destination)
                (out_dir / "lungnode.log").write_text(log_text, encoding="utf-8")
            else:
                raise ValueError(f"source must be one of {SOURCES}")
            report.seconds["populate"] = time.monotonic() - t0
            studies = orthanc.find("Study", {})
            if len(studies) != 1:
                raise RuntimeError(f"expected one study in Orthanc, found {len(studies)}")
            report.study_uid = studies[0]["MainDicomTags"]["StudyInstanceUID"]
            by_mod = orthanc.series_by_modality(report.study_uid)
            seg_series = by_mod.get("SEG", [])
            if not seg_series:
                raise RuntimeError(f"no SEG in Orthanc (series by modality: {sorted(by_mod)})")
            truth = read_seg_truth(instances_of(orthanc, seg_series[0]))
            driver = start_chromium(work / "chromium-profile")
            try:
                _browse(driver, orthanc, report, truth, by_mod, out_dir)
                if keep_open:
                    log.info("browser and Orthanc stay up %.0f s at %s%s/viewer?StudyInstanceUIDs=%s",
                             keep_open, orthanc.url, OHIF_BASE, report.study_uid)
                    time.sleep(keep_open)
            finally:
                driver.quit()
    finally:
        report.seconds["total"] = time.monotonic() - t_start
        (out_dir / "report.json").write_text(report.to_json(), encoding="utf-8")
        shutil.rmtree(work, ignore_errors=True)
    return report


def _image_sops(page: OhifPage) -> list[str]:
    js = """
const cs = window.cornerstone; let vp = null;
for (const e of cs.getRenderingEngines()) for (const v of e.getViewports())
  if (v.element && v.element.isConnected && v.element.offsetWidth > 0) vp = v;
return vp && vp.getImageIds ? vp.getImageIds() : [];
"""
    ids = page.driver.execute_script(js)
    return [str(i).split("/instances/", 1)[1].split("/", 1)[0] if "/instances/" in str(i) else ""
            for i in ids]


def _browse(driver: Any, orthanc: Orthanc, report: ProofReport, truth: SegTruth,
            by_mod: dict[str, list[dict[str, Any]]], out_dir: Path) -> None:
    t0 = time.monotonic()
    page = OhifPage(driver, orthanc.url)
    page.open_study(report.study_uid)
    report.seconds["first_image"] = time.monotonic() - t0
    page.screenshot(out_dir / "00-study-opened.png")
    sops = _image_sops(page)
    full, empty = pick_slices(truth, sops)
    # 1. the CT alone on both slices (the reference for "inside the rendered lungs")
    ct_pages: dict[int, ImageU8] = {}
    for idx, name in ((full, "content"), (empty, "empty")):
        page.go_to_index(idx)
        ct_pages[idx] = page.screenshot(out_dir / f"01-ct-only-{name}-slice.png")
    # 2. the SEG loaded, same slices
    page.load_seg(truth.series_description or "SEG")
    report.ohif_segmentations = page.segmentations()
    for idx, name in ((full, "content"), (empty, "empty")):
        state = page.go_to_index(idx)
        shot = out_dir / f"02-seg-{name}-slice.png"
        img = page.screenshot(shot)
        report.seg_slices.append(analyse_seg_slice(name, state, img, ct_pages[idx], truth, shot))
    report.seconds["seg_done"] = time.monotonic() - t0
    # 3. the Secondary Capture overlay series: opens as ordinary images
    sc_series = [s for m, lst in by_mod.items() if m not in ("CT", "SEG", "SR") for s in lst]
    if sc_series:
        sc_instances = instances_of(orthanc, sc_series[0])
        report.sc_series_count = len(sc_instances)
        sc_source = {str(ds.SOPInstanceUID): str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)
                     for ds in sc_instances if "SourceImageSequence" in ds}
        page.double_click_series(str(sc_instances[0].get("SeriesDescription", "")) or "OT")
        wait_until(lambda: (st := page.state()) and st.sop_uid in sc_source, 60,
                   "the SC series in the viewport")
        page.settle()
        report.sr["cine_player_closed_for_sc"] = page.close_cine()
        sc_sops = _image_sops(page)
        report.sc_shown_count = len(sc_sops)
        for src_idx, name in ((full, "content"), (empty, "empty")):
            want = sops[src_idx]
            sc_idx = next(i for i, s in enumerate(sc_sops) if sc_source.get(s) == want)
            state = page.go_to_index(sc_idx)
            shot = out_dir / f"03-sc-{name}-slice.png"
            img = page.screenshot(shot)
            crop = state.crop(img)
            # the legend (top left) and the warning (bottom) carry the colours on every image
            bands = np.zeros(crop.shape[:2], dtype=bool)
            bands[: int(0.12 * crop.shape[0])] = True
            bands[int(0.9 * crop.shape[0]):] = True
            check = SliceCheck(name, state.sop_uid, state.index, str(shot),
                               sorted(truth.labels_on(want)),
                               colour_counts(crop, truth.colours, exclude=bands),
                               image_box=state.image_box)
            ct_idx = src_idx
            ct_crop = state.crop(ct_pages[ct_idx]) if ct_idx in ct_pages else None
            if ct_crop is not None and ct_crop.shape == crop.shape:
                from scipy import ndimage

                lungs = ndimage.binary_dilation(rendered_lung_region(ct_crop), iterations=4)
                for label, rgb in truth.colours.items():
                    m = colour_mask(crop, rgb) & ~bands
                    if m.sum():
                        check.inside_rendered_lungs[label] = float((m & lungs).sum() / m.sum())
            report.sc_slices.append(check)
    report.seconds["sc_done"] = time.monotonic() - t0
    # everything up to here must be free of errors; the SR is looked at on its own
    report.browser_errors = page.errors(page.read_console())
    # 4. the SR: what does OHIF make of it?
    for sr_series in by_mod.get("SR", [])[:1]:
        desc = str(sr_series["MainDicomTags"].get("SeriesDescription", "")) or "SR"
        before = page.body_text()
        page.double_click_series(desc)
        time.sleep(6.0)
        page.screenshot(out_dir / "04-sr.png")
        after = page.body_text()
        console = page.read_console()
        report.sr = {**report.sr, "series_description": desc, "listed_in_study_browser": desc in before,
                     "text_after_open": after[:SR_TEXT_LIMIT],
                     "viewport_state": (st.__dict__ if (st := page.state()) else None),
                     "ohif_display_sets": page.driver.execute_script(SR_DISPLAY_SETS_JS),
                     "errors_on_open": page.errors(console),
                     "console_on_open": [str(e["message"])[:300] for e in console
                                         if "SR" in e["message"] or "easurement" in e["message"]]}
    report.seconds["browser"] = time.monotonic() - t0


def main(argv: Sequence[str] | None = None) -> int:
    """``tools/viewer_proof.py [--source node|builders|harness] [--out DIR]``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parser = argparse.ArgumentParser(description="Show lungnode's results in OHIF (headless "
                                     "Chromium) and leave screenshots for a person to look at.")
    parser.add_argument("--out", type=Path, default=REPO / "test-artifacts" / "viewer",
                        help="folder for the screenshots and report.json")
    parser.add_argument("--source", choices=SOURCES, default="node",
                        help="node: CT through `lungnode run` (default); builders: lungnode's "
                             "SEG/SR/SC builders on a threshold result; harness: a highdicom SEG")
    parser.add_argument("--engine", choices=("auto", "model", "threshold"), default="auto",
                        help="segmentation inside `lungnode run` (source node): the configured model, "
                             "the threshold stand-in, or auto (model if its bundle exists)")
    parser.add_argument("--destination-option", action="append", default=[], metavar="KEY=JSON",
                        help="extra key of the node's [[destinations]] entry, e.g. "
                             "omit_empty_frames=true (repeatable)")
    parser.add_argument("--harness-shift", type=int, default=0, metavar="COLUMNS",
                        help="source harness: move the SEG's masks this many columns (a misplaced "
                             "SEG, to see the checks fail)")
    parser.add_argument("--ct", type=Path, default=None, help="CT series folder")
    parser.add_argument("--keep-open", type=float, default=0.0,
                        help="seconds to keep Orthanc and the browser up at the end")
    args = parser.parse_args(argv)
    # SIGTERM → SystemExit, so that Orthanc, the node and Chromium are stopped by the finally blocks
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    destination = {k: json.loads(v) for k, v in (o.split("=", 1) for o in args.destination_option)}
    report = run_proof(args.out, args.source, args.ct, keep_open=args.keep_open, engine=args.engine,
                       destination=destination, harness_shift=args.harness_shift)
    print(report.to_json())
    print(f"screenshots: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
