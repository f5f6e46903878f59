"""Build every output object of one result for one destination profile.

:func:`build_outputs` is the single entry point used by the pipeline (per destination), by the
offline ``lungnode infer`` command and by the benchmark, so all of them write the same objects.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

from pydicom.dataset import Dataset

from lungnode.config import DestinationConfig
from lungnode.inference.comparison import Comparison
from lungnode.inference.report import severity_for
from lungnode.inference.severity import SeverityReport
from lungnode.inference.types import InferenceResult
from lungnode.node.results.common import OutputContext, SourceSeries, encode
from lungnode.node.results.sc import build_sc_series
from lungnode.node.results.seg import SegOptions, build_segs, segment_specs
from lungnode.node.results.sr import build_sr
from lungnode.node.results.summary import build_pdf, build_summary_sc, render_page

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Profile:
    """What to build for one destination.

    Attributes
    ----------
    objects:
        Any of ``seg``, ``sr``, ``sc``, ``summary`` (the one-page report as a Secondary
        Capture), ``pdf`` (the same page as an Encapsulated PDF). An SR needs the SEG it
        references, so ``sr`` alone still builds the SEG, which is then simply not sent.
    seg:
        SEG options.
    """

    objects: tuple[str, ...] = ("seg", "sr", "summary")
    seg: SegOptions = field(default_factory=SegOptions)

    @classmethod
    def from_destination(cls, dest: DestinationConfig) -> Profile:
        """The profile of a configured destination."""
        return cls(objects=tuple(dest.objects),
                   seg=SegOptions(transfer_syntax=dest.seg_transfer_syntax,
                                  omit_empty_frames=dest.omit_empty_frames,
                                  one_seg_per_segment=dest.one_seg_per_segment,
                                  max_frames_per_seg=dest.max_frames_per_seg))


@dataclass(frozen=True)
class BuiltOutput:
    """One encoded output object."""

    kind: str
    dataset: Dataset
    data: bytes

    @property
    def sop_instance_uid(self) -> str:
        """SOP Instance UID."""
        return str(self.dataset.SOPInstanceUID)

    @property
    def sop_class_uid(self) -> str:
        """SOP Class UID."""
        return str(self.dataset.SOPClassUID)

    @property
    def series_uid(self) -> str:
        """Series Instance UID."""
        return str(self.dataset.SeriesInstanceUID)

    @property
    def transfer_syntax_uid(self) -> str:
        """Transfer syntax the bytes are encoded in."""
        return str(self.dataset.file_meta.TransferSyntaxUID)


def build_outputs(result: InferenceResult, ctx: OutputContext, profile: Profile, *,
                  source: SourceSeries | None = None, predecessor_sr: Dataset | None = None,
                  timings: dict[str, float] | None = None,
                  report: SeverityReport | None = None,
                  comparison: Comparison | None = None) -> list[BuiltOutput]:
    """Build and encode the SEG, SR, SC and summary objects of ``result`` for one profile.

    Parameters
    ----------
    result:
        Masks, measurements and source geometry.
    ctx:
        Producer identity (job, model, series numbers).
    profile:
        Which objects and SEG settings.
    source:
        Source headers (read from ``result.volume.source_files`` when ``None``).
    predecessor_sr:
        SR of the superseded job (goes into Predecessor Documents Sequence).
    timings:
        Filled with seconds per object kind when given.
    report:
        Severity figures (:func:`~lungnode.inference.report.severity_for` with default options
        when ``None``).
    comparison:
        The prior exam's figures or why there are none (``None``: nothing said about priors).

    Returns
    -------
    list of BuiltOutput
        SEG part(s), then the SR, then SC images, then the summary page and its PDF, as
        requested by the profile.
    """
    timings = timings if timings is not None else {}
    source = source or SourceSeries.from_files(result.volume.source_files)
    suffix = " (replaces earlier)" if predecessor_sr is not None else ""
    specs = segment_specs(result.lung_labels > 0, result.infiltrate)
    out: list[BuiltOutput] = []
    with warnings.catch_warnings():
        # highdicom warns about single-component patient names copied from the source.
        warnings.simplefilter("ignore", UserWarning)
        segs: list[Dataset] = []
        if "seg" in profile.objects or "sr" in profile.objects:
            t0 = time.perf_counter()
            segs = build_segs(source, specs, ctx, profile.seg, description_suffix=suffix)
            if "seg" in profile.objects:
                out.extend(BuiltOutput("seg", ds, encode(ds)) for ds in segs)
            timings["seg"] = time.perf_counter() - t0
        if any(o in profile.objects for o in ("sr", "summary", "pdf")):
            t0 = time.perf_counter()
            report = report or severity_for(result)
            timings["report"] = time.perf_counter() - t0
        if "sr" in profile.objects:
            t0 = time.perf_counter()
            sr = build_sr(source, segs, specs, result.measurements, ctx,
                          predecessor=predecessor_sr, description_suffix=suffix, report=report,
                          comparison=comparison)
            out.append(BuiltOutput("sr", sr, encode(sr)))
            timings["sr"] = time.perf_counter() - t0
        if "sc" in profile.objects:
            t0 = time.perf_counter()
            out.extend(BuiltOutput("sc", ds, encode(ds))
                       for ds in build_sc_series(result, source, ctx, description_suffix=suffix))
            timings["sc"] = time.perf_counter() - t0
        if "summary" in profile.objects or "pdf" in profile.objects:
            t0 = time.perf_counter()
            assert report is not None  # computed above
            page = render_page(result, report, source, ctx, comparison)
            if "summary" in profile.objects:
                ds = build_summary_sc(result, page, source, ctx, description_suffix=suffix)
                out.append(BuiltOutput("summary", ds, encode(ds)))
            if "pdf" in profile.objects:
                ds = build_pdf(result, page, source, ctx, description_suffix=suffix)
                out.append(BuiltOutput("pdf", ds, encode(ds)))
            timings["summary"] = time.perf_counter() - t0
    log.info("built %s for job %d in %s", ", ".join(sorted({o.kind for o in out})), ctx.job_id,
             ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
    return out


def profiles_for(destinations: Sequence[DestinationConfig]) -> dict[str, Profile]:
    """Profile per destination name; ``{"": all objects}`` when none is configured."""
    if not destinations:
        return {"": Profile()}
    return {d.name: Profile.from_destination(d) for d in destinations}
