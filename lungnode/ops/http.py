"""Outgoing HTTP requests of the node (webhook notifications, DICOMweb STOW-RS and its check).

:func:`open_url` sends a request with the receiver's timeout and, for ``https://``, a certificate
check against ``ca`` (empty: the system's CAs). Redirects are not followed: urllib would turn a
POST answered with 301, 302 or 303 into a GET without the body, whose ``200`` would then count as
an acknowledgement (a STOW-RS "stored" or a webhook "sent") although nothing was received. A
redirect is an answer like any other non-2xx one (:class:`urllib.error.HTTPError` with its code);
:func:`redirect_hint` names where it pointed, so an admin can fix the configured URL.
"""

from __future__ import annotations

import email.message
import http.client
import ssl
import urllib.error
import urllib.request
from typing import IO


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Raise the 3xx answer as an :class:`~urllib.error.HTTPError` instead of following it."""

    def redirect_request(self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str,
                         headers: email.message.Message, newurl: str) -> None:
        return None


def open_url(request: urllib.request.Request, timeout: float, ca: str = "") -> http.client.HTTPResponse:
    """Send ``request`` without following redirects.

    Parameters
    ----------
    request:
        The request (method, URL, headers, body).
    timeout:
        Seconds for connecting and for each read.
    ca:
        PEM CA bundle to verify an ``https://`` server against (empty: the system's CAs).

    Returns
    -------
    http.client.HTTPResponse
        A 2xx answer (use it as a context manager).

    Raises
    ------
    urllib.error.HTTPError
        Any other answer, redirects included.
    OSError
        No answer (refused, timed out, TLS failure).
    """
    handlers: list[urllib.request.BaseHandler] = [_NoRedirect()]
    if request.full_url.startswith("https://"):
        handlers.append(urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=ca or None)))
    response: http.client.HTTPResponse = urllib.request.build_opener(*handlers).open(request,
                                                                                     timeout=timeout)
    return response


def redirect_hint(exc: urllib.error.HTTPError) -> str:
    """`` (redirected to URL: configure the final address)`` for a 3xx answer, else ``""``."""
    if not 300 <= exc.code < 400:
        return ""
    return f" (redirected to {exc.headers.get('Location', '?')}: configure the final address)"
