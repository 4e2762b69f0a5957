"""The stages of `volscan screen`, in order: inputs, preprocess, tokens, score, outputs.

Each stage is one module with one entry point that takes its settings whole and returns a
small typed result; `pipelines.screen` only calls them in order. Heavy libraries (torch,
timm, matplotlib) are imported inside the stage functions, so importing a stage is cheap and
input errors are answered before any of them loads.
"""
