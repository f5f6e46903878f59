#!/usr/bin/env python3
"""Fuzz a running lungnode (or any C-STORE SCP) over the network and print what it answered.

Seeded and repeatable: ``--seed`` and ``--cases`` fix every case. Each case opens its own
connection, sends one kind of bad input and records the node's answer:

========== ===================================================================================
family     what is sent
========== ===================================================================================
pdu        malformed A-ASSOCIATE-RQs (bit flips, cuts, empty or non-ASCII AE titles, a context
           without transfer syntax), unknown PDU types, PDUs out of order
command    malformed DIMSE command sets on an association (cut or bad elements, non-ASCII UIDs,
           unknown commands, C-ECHO on a storage context, a C-STORE without data set)
dataset    a real CT slice with its data set mutated (bit flips and byte runs in the header,
           cut at a random place, element lengths and VRs changed, garbage appended)
pixels     pixel data that does not fit the header (short, long, empty, Rows = Columns = 65535,
           float pixel data, encapsulated without fragment, deflated and short, trailing bytes,
           explicit VR on an implicit VR context)
huge       lengths meant to make the node allocate (P-DATA-TF, PDV, A-RELEASE-RQ and
           A-ASSOCIATE-RQ of 0xFFFFFFF0 bytes, a command PDV of 4 MiB, a deflate bomb)
trickle    connections that send one byte at a time, slowly, while a real C-ECHO must succeed
========== ===================================================================================

Outcomes: ``status 0xNNNN`` (a DIMSE status), ``A-ASSOCIATE-RJ``, ``A-ABORT``,
``A-ASSOCIATE-AC`` (a mutated request that is still valid), ``closed (peer aborted)`` (the case
sent an A-ABORT itself: no answer is due), ``closed`` (closed without an answer: a finding),
``cut`` (a trickle closed by the node within its timeout). Findings are listed after the
table: a case that got no answer, a deliberately broken pixel case acknowledged with 0x0000, a
C-ECHO that failed between cases. With ``--storage-root`` (the node's ``[storage] root`` on this
machine) every stored file is read back with pydicom (and DCMTK ``dcmdump`` when installed).

Example::

    .venv/bin/python -m tools.fuzz_node --host 127.0.0.1 --port 11112 --cases 2000 --seed 1 \\
        --calling-ae PACS --sample /path/to/ct-slice.dcm
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pydicom

from tools.fuzzing.cases import FAMILIES, Case, Fuzzer

__all__ = ["FAMILIES", "Case", "Fuzzer", "Results", "check_store", "format_table", "run_campaign"]

#: Families whose cases must never be acknowledged with success.
MUST_FAIL = frozenset({"pixels"})
DEFAULT_SAMPLE = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "ct" / \
    "chest-30-slices-uncompressed"


@dataclass
class Results:
    """Outcomes per family and the findings."""

    table: dict[str, collections.Counter[str]] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter))
    findings: list[str] = field(default_factory=list)
    acknowledged: list[str] = field(default_factory=list)
    cases: int = 0

    def add(self, case: Case, outcome: str) -> None:
        """Count one case's outcome and note it as a finding when it is one."""
        if case.closing and outcome == "closed":
            outcome = "closed (peer aborted)"
        self.cases += 1
        self.table[case.family][outcome] += 1
        if outcome == "closed":
            self.findings.append(f"{case.family}/{case.label}: no answer (bare close)")
        if outcome == "status 0x0000" and case.sop_instance_uid:
            self.acknowledged.append(case.sop_instance_uid)
            if case.family in MUST_FAIL:
                self.findings.append(f"{case.family}/{case.label}: acknowledged with 0x0000")




# ------------------------------------------------------------------------------------- checks
def check_store(root: Path, acknowledged: Iterable[str]) -> list[str]:
    """Problems with what the node stored: acknowledged instances that are not readable in full
    by pydicom (and DCMTK dcmdump when installed), or temp files left behind."""
    problems: list[str] = []
    dcmdump = shutil.which("dcmdump")
    files = {p.name.split(".dcm")[0].split(".v")[0]: p for p in root.rglob("*.dcm")
             if ".tmp" not in p.parts and "results" not in p.parts}
    for uid in acknowledged:
        path = files.get(uid)
        if path is None:
            problems.append(f"{uid}: acknowledged but not stored")
            continue
        try:
            ds = pydicom.dcmread(path)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for element in ds.iterall():  # every value converted: reading in full is the check
                    _ = element.value
            if "PixelData" in ds and not ds.file_meta.TransferSyntaxUID.is_compressed:
                ds.pixel_array  # noqa: B018 - decoding is the check
        except Exception as exc:
            problems.append(f"{path.name}: pydicom cannot read it ({type(exc).__name__})")
            continue
        if dcmdump:
            run = subprocess.run([dcmdump, "-q", "+E", str(path)], capture_output=True, text=True,
                                 errors="replace")
            if run.returncode != 0 or "E: " in run.stderr:
                problems.append(f"{path.name}: dcmdump fails ({run.stderr.strip()[:200]})")
    tmp = root / ".tmp"
    if tmp.is_dir() and any(tmp.iterdir()):
        problems.append(f"temp files left: {sorted(p.name for p in tmp.iterdir())[:5]}")
    return problems


def run_campaign(fuzzer: Fuzzer, n: int, *, trickles: int = 0, echo_every: int = 25,
                 families: Iterable[str] = FAMILIES,
                 progress: Callable[[int, Case, str], None] | None = None) -> Results:
    """Run ``n`` cases (and a batch of ``trickles`` trickle connections); the outcomes."""
    results = Results()
    for i, case in enumerate(fuzzer.cases(n, families)):
        try:
            outcome = case.run(fuzzer)
        except (OSError, ConnectionError) as exc:
            outcome = "closed" if "not accepted" not in str(exc) else str(exc).split(": ", 1)[-1]
        results.add(case, outcome)
        if progress is not None:
            progress(i, case, outcome)
        if echo_every and (i + 1) % echo_every == 0 and not fuzzer.echo_ok():
            results.findings.append(f"C-ECHO failed after case {i} ({case.family}/{case.label})")
    if trickles:
        outcomes, echo = fuzzer.trickle(trickles)
        for outcome in outcomes:
            results.add(Case("trickle", "one byte a second", _batched), outcome)
        if not echo:
            results.findings.append("C-ECHO failed while trickling connections were open")
        not_cut = [o for o in outcomes if o != "cut"]
        if not_cut:
            results.findings.append(f"{len(not_cut)} trickling connection(s) not cut: {not_cut[:3]}")
    if not fuzzer.echo_ok():
        results.findings.append("C-ECHO failed after the campaign")
    return results


def _batched(fuzzer: Fuzzer) -> str:
    """The run of a case that is run in a batch (trickle), not on its own."""
    raise NotImplementedError("trickle cases run together in Fuzzer.trickle")


def format_table(results: Results) -> str:
    """Families × outcomes as a Markdown table."""
    outcomes = sorted({o for counter in results.table.values() for o in counter})
    lines = ["| family | cases | " + " | ".join(outcomes) + " |",
             "| --- | --- | " + " | ".join("---" for _ in outcomes) + " |"]
    for family in FAMILIES:
        counter = results.table.get(family)
        if not counter:
            continue
        lines.append(f"| {family} | {sum(counter.values())} | "
                     + " | ".join(str(counter.get(o, "")) for o in outcomes) + " |")
    return "\n".join(lines)


def _sample_path(given: str | None) -> Path:
    if given:
        return Path(given)
    files = sorted(DEFAULT_SAMPLE.glob("*.dcm"))
    if not files:
        sys.exit("no --sample given and the default sample folder is absent")
    return files[0]


def main(argv: list[str] | None = None) -> int:
    """Run a campaign from the command line; exit status 1 with findings, 2 when the node is not
    reachable."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--calling-ae", default="PACS", help="an AE title the node accepts")
    parser.add_argument("--called-ae", default="LUNGNODE")
    parser.add_argument("--sample", help="a CT Image Storage file to mutate (native pixel data)")
    parser.add_argument("--trickles", type=int, default=60,
                        help="trickling connections opened at the end (0: none)")
    parser.add_argument("--trickle-wait", type=float, default=40.0,
                        help="seconds the node gets to cut them (its acse_timeout_s plus a margin)")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--storage-root", help="the node's [storage] root, to read back what it stored")
    parser.add_argument("--timeout", type=float, default=20.0)
    args = parser.parse_args(argv)
    fuzzer = Fuzzer(args.host, args.port, args.calling_ae, args.called_ae, _sample_path(args.sample),
                    args.seed, timeout=args.timeout, trickle_s=args.trickle_wait)
    if not fuzzer.echo_ok():
        print("the node does not answer a C-ECHO: check --port and --calling-ae", file=sys.stderr)
        return 2
    started = time.monotonic()
    families = [f for f in args.families.split(",") if f]

    def progress(i: int, case: Case, outcome: str) -> None:
        if (i + 1) % 100 == 0:
            print(f"{i + 1} cases, {time.monotonic() - started:.0f} s", file=sys.stderr)

    results = run_campaign(fuzzer, args.cases, trickles=args.trickles if "trickle" in families else 0,
                           families=families, progress=progress)
    problems = check_store(Path(args.storage_root), results.acknowledged) if args.storage_root else []
    print(format_table(results))
    print(f"\n{results.cases} cases in {time.monotonic() - started:.0f} s, seed {args.seed}; "
          f"{len(results.acknowledged)} acknowledged with 0x0000")
    for finding in results.findings + problems:
        print(f"FINDING: {finding}")
    return 1 if results.findings or problems else 0


if __name__ == "__main__":
    sys.exit(main())
