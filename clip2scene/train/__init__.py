"""Stage two: the spconv student, losses, training and evaluation, reading only the cache."""
