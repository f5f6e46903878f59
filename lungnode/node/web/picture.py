"""The job page's picture: up to three key slices with lung and infiltrate outlines, as PNG.

Made once per job from what the job stored (its SEG and the source CT slices it references) and
kept at ``<storage root>/web/job-N.png`` (deleted by retention with the job's results); later
requests serve the file. The slices are the one with the most infiltrate, and the ones with the
most lung above and below it (or the three with the most lung when there is no infiltrate). No
patient data is drawn.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from PIL import Image, ImageDraw, ImageFont
from sqlalchemy import select

from lungnode.node.results.sc import lung_window, outline
from lungnode.node.results.seg import INFILTRATE_RGB, LUNG_RGB
from lungnode.storage.db import Database
from lungnode.storage.filestore import FileStore
from lungnode.storage.models import Instance, Job, Output, aware

#: Edge length of each slice tile in the picture.
TILE = 320


class NoPictureError(LookupError):
    """The job has no stored SEG (or its files are gone)."""


def picture_path(store: FileStore, job_pk: int) -> Path:
    """Where the picture of a job is kept (retention deletes it with the job's results)."""
    return store.path(store.picture_relpath(job_pk))


def _seg_frames(path: Path) -> dict[str, dict[str, npt.NDArray[np.bool_]]]:
    """``{source SOP UID: {"lung"|"infiltrate": mask}}`` from a BINARY SEG file."""
    ds = pydicom.dcmread(path)
    labels = {int(item.SegmentNumber): str(item.SegmentLabel).lower() for item in ds.SegmentSequence}
    pixels = np.asarray(ds.pixel_array).astype(bool)
    if pixels.ndim == 2:
        pixels = pixels[None]
    out: dict[str, dict[str, npt.NDArray[np.bool_]]] = {}
    for i, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        segment = int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        source = str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        kind = "infiltrate" if "infiltrate" in labels.get(segment, "") else "lung"
        slot = out.setdefault(source, {})
        slot[kind] = slot[kind] | pixels[i] if kind in slot else pixels[i]
    return out


def _choose(masks: dict[str, dict[str, npt.NDArray[np.bool_]]], order: list[str]) -> list[str]:
    """Up to three source UIDs (in slice order) worth showing."""
    present = [u for u in order if u in masks]
    if not present:
        return []
    infiltrate = {u: int(masks[u].get("infiltrate", np.zeros(1, bool)).sum()) for u in present}
    lung = {u: int(masks[u].get("lung", np.zeros(1, bool)).sum()) for u in present}
    best = max(present, key=lambda u: (infiltrate[u], lung[u]))
    if infiltrate[best] == 0:
        return sorted(sorted(present, key=lambda u: lung[u], reverse=True)[:3], key=present.index)
    k = present.index(best)
    above, below = present[:k], present[k + 1:]
    picks = [best]
    if above:
        picks.append(max(above[: max(1, len(above) - 2)], key=lambda u: lung[u]))
    if below:
        picks.append(max(below[min(2, len(below) - 1):], key=lambda u: lung[u]))
    return sorted(set(picks), key=present.index)


def _tile(ct_path: Path, masks: dict[str, npt.NDArray[np.bool_]]) -> Image.Image:
    ds = pydicom.dcmread(ct_path)
    hu = ds.pixel_array.astype(np.float32) * float(getattr(ds, "RescaleSlope", 1) or 1) \
        + float(getattr(ds, "RescaleIntercept", 0) or 0)
    rgb = np.repeat(lung_window(hu)[:, :, None], 3, axis=2)
    for kind, colour in (("lung", LUNG_RGB), ("infiltrate", INFILTRATE_RGB)):
        mask = masks.get(kind)
        if mask is not None and mask.shape == hu.shape:
            rgb[outline(mask)] = colour
    return Image.fromarray(rgb).resize((TILE, TILE), Image.Resampling.LANCZOS)


def render_picture(db: Database, store: FileStore, job_pk: int) -> bytes:
    """Draw the picture of a job (PNG bytes).

    Raises
    ------
    NoPictureError
        No SEG stored for the job, or its source slices are gone.
    """
    with db.session() as s:
        job = s.get(Job, job_pk)
        seg_rel = s.scalars(select(Output.path).where(Output.job_pk == job_pk, Output.kind == "seg")
                            .order_by(Output.id)).all()
        model = f"{job.model_id} {job.model_version}" if job else ""
        instances = {i.sop_instance_uid: (i.path, i.image_position) for i in s.scalars(
            select(Instance).where(Instance.current.is_(True),
                                   Instance.series.has(series_uid=job.series_uid if job else "")))}
    masks: dict[str, dict[str, npt.NDArray[np.bool_]]] = {}
    for rel in seg_rel:
        if store.path(rel).is_file():
            for uid, parts in _seg_frames(store.path(rel)).items():
                for kind, m in parts.items():
                    slot = masks.setdefault(uid, {})
                    slot[kind] = slot[kind] | m if kind in slot else m
    if not masks:
        raise NoPictureError(f"job {job_pk} has no stored segmentation")

    def z(uid: str) -> float:
        try:
            return float(instances[uid][1].split("\\")[2])
        except (KeyError, IndexError, ValueError):
            return 0.0

    order = sorted((u for u in masks if u in instances), key=z, reverse=True)
    chosen = [u for u in _choose(masks, order) if store.path(instances[u][0]).is_file()]
    if not chosen:
        raise NoPictureError(f"the source slices of job {job_pk} are no longer stored")
    tiles = [_tile(store.path(instances[u][0]), masks[u]) for u in chosen]
    caption = 26
    canvas = Image.new("RGB", (TILE * len(tiles), TILE + caption), (0, 0, 0))
    for i, tile in enumerate(tiles):
        canvas.paste(tile, (i * TILE, caption))
    draw = ImageDraw.Draw(canvas)
    try:
        font: ImageFont.ImageFont | ImageFont.FreeTypeFont = ImageFont.load_default(size=15)
    except TypeError:  # Pillow without FreeType
        font = ImageFont.load_default()
    head = f"job {job_pk}  {model}   "
    draw.text((6, 4), head, fill=(230, 230, 230), font=font)
    x = 6 + draw.textlength(head, font=font)
    draw.text((x, 4), "lung outline   ", fill=LUNG_RGB, font=font)
    x += draw.textlength("lung outline   ", font=font)
    draw.text((x, 4), "infiltrate outline", fill=INFILTRATE_RGB, font=font)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def job_picture(db: Database, store: FileStore, job_pk: int) -> bytes:
    """The picture of a job: the kept file, or drawn now and kept (written atomically).

    The file's modification time is set to the job's end, so that retention, which leaves files
    newer than the results it deletes, treats the picture as part of them.
    """
    path = picture_path(store, job_pk)
    if path.is_file():
        return path.read_bytes()
    png = render_picture(db, store, job_pk)
    with db.session() as s:
        job = s.get(Job, job_pk)
        finished = job.finished_at if job is not None else None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(png)
    if finished is not None:
        stamp = aware(finished).timestamp()
        os.utime(tmp, (stamp, stamp))
    os.replace(tmp, path)
    return png
