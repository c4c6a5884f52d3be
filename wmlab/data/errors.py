"""Errors a user can cause with data. Each message names the file or value and the fix."""

from __future__ import annotations

from wmlab.integrity import UserError


class DatasetError(UserError, ValueError):
    """A dataset is missing, truncated, inconsistent or does not fit the request."""
