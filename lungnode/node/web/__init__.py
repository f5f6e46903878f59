"""The status web pages of the node, served beside ``/metrics`` and ``/healthz``.

``GET /``                   overview: health, disk, queues, rates, the last 100 series, held jobs,
                            failing and dead-letter deliveries, notifications and shadow sends.
``GET /series/UID``         one series: the rules' explanation and its jobs.
``GET /jobs/N``             one job: history and attempts, deliveries per destination, outputs,
                            notifications, the audit trail, measurements and a picture.
``GET /jobs/N/picture.png`` key slices with lung and infiltrate outlines (made once per job).
``POST /jobs/N/action``     release, retry, resend or reprocess (only with ``[web] actions = true``
                            and a token from ``[web] token_file``; audited with the token's name).

Plain HTML with a meta refresh and inline CSS: no JavaScript, nothing loaded from elsewhere.
Patient names, IDs and birth dates appear only with ``[web] show_patient_data = true``.
"""
