"""Operators that drop or tag samples. Importing the package registers them."""

from filters import integrity  # noqa: F401
