"""Small helpers shared by training, evaluation and export (no EMO maths here)."""
