"""The prebuilt OHIF viewer: fetched with ``npm pack`` (pinned, integrity-checked) and prepared
to be served under ``/ohif/`` from Orthanc's origin."""

from __future__ import annotations

import base64
import hashlib
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from tools.ohif_proof.common import DEFAULT_CACHE, OHIF_BASE, OHIF_INTEGRITY, OHIF_ROUTES, OHIF_VERSION, log

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
