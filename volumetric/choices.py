"""The named choices of token options, in a module without heavy imports (no torch), so the
command line offers them (`pipelines.choices`) without loading the model code."""

# ViT arithmetic: "auto" resolves per device (`volumetric.tokens.resolve_precision`).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
