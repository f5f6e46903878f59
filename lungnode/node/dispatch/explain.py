"""Why a stored series was (or would be) dispatched: the text of ``lungnode explain``.

Shared by the command line (``explain``, ``rules dry-run``) and the status web page.
"""

from __future__ import annotations

from sqlalchemy import select

from lungnode.config import Config
from lungnode.node.dispatch.completion import OWN_OUTPUT_RULE
from lungnode.node.dispatch.rules import Decision, decide, format_decision, format_features, load_features
from lungnode.storage.db import Database
from lungnode.storage.models import Series


def explain_lines(db: Database, config: Config, series_uid: str, verbose: bool) -> list[str] | None:
    """The selection rules' verdict on a stored series, as ``lungnode explain`` prints it.

    Parameters
    ----------
    db, config:
        The database and the configuration (its ``[[rules]]``).
    series_uid:
        The series.
    verbose:
        Every feature and condition (``explain``, the web page), or one summary line
        (``rules dry-run``).

    Returns
    -------
    list of str or None
        The lines; ``None`` when the series is not stored.
    """
    with db.session() as s:
        series = s.scalar(select(Series).where(Series.series_uid == series_uid))
        if series is None:
            return None
        features = load_features(s, series)
        state, stored = series.state, f"{series.decision or '-'} ({series.decision_rule or '-'})"
    decision = (Decision("exclude", OWN_OUTPUT_RULE) if features.own_output
                else decide(config.rules, features))
    if not verbose:
        return [f"{decision.action:<8} {decision.rule:<20} {state:<10} {features.slices:>5} "
                f"{series_uid}"]
    lines = [f"series {series_uid}: state {state}, stored decision {stored}"]
    lines += ["features: " + line for line in format_features(features)]
    if features.own_output:
        lines.append(f"decision: exclude (rule: {OWN_OUTPUT_RULE}: made by lungnode, never dispatched)")
    else:
        lines += format_decision(decision)
    return lines
