"""NIfTI-first preprocessing: IO, SRI-24 template, registration, brain mask, crop/resize, Nyúl."""
