"""The student's distillation losses by name ('hinton', 'authors'): defined in ued_fast.uste (its
section 4, Losses), importable from here as before."""
from .uste import VARIANTS, authors_kd_loss, distill_loss  # noqa: F401
