"""User-facing pipelines: the `volscan` CLI, screening, evaluation, reports, reproduction."""
