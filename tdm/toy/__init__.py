"""The embedded toy: load_digits data, the toy teacher and the evaluation classifier."""
