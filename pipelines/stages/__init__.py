"""The stages of `volscan screen`, in order: (1, the plan) preprocess, tokens, score, scan maps.

Before them, the settings and inputs are checked into the run's `pipelines.plan.ScreenPlan`;
each stage is one module with one entry point that takes its part of the plan and returns a
small typed result; `pipelines.screen` only calls them in order. Heavy libraries (torch, timm,
monai, matplotlib, and the pipelines modules that load them at their top: `evaluate`,
`report`, `figures`) are imported inside the stage functions, so importing a stage is cheap
and settings or input errors are answered before any of them loads.
"""
