"""From a complete series to a finished job: completion, selection rules, the job queue, workers,
the pipeline and the quality gate."""
