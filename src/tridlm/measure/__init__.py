"""Measuring the engine: ``tridlm bench`` (``suite``) over the bench harness and its baselines (``harness``,
``baselines``), task scores (``evaluate``, answers run in ``sandbox``), draft-adapter evaluation (``draft_eval``),
tables and plots (``reporting``, ``plots``), and random-weight GGUF files at real shapes (``random_gguf``). Nothing
below this package imports it."""
