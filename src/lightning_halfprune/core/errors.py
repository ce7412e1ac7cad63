"""What surgery raises: the model is always left exactly as it was before."""

from __future__ import annotations

from collections.abc import Sequence


class SurgeryError(RuntimeError):
    """Surgery could not be done; the model was left exactly as it was before.

    ``groups`` names the coupled groups (by root layer) the failure is attributed to, where known.
    """

    def __init__(self, message: str, groups: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.groups = list(groups)


class BrokenForward(SurgeryError):
    """The pruned model no longer ran the example input (or changed its output's shape); the cut was undone.

    ``layer`` is the innermost module whose forward was running when it failed ('' for the model itself).
    """

    def __init__(self, message: str, groups: Sequence[str] = (), layer: str | None = None, reason: str = "") -> None:
        super().__init__(message, groups)
        self.layer = layer
        self.reason = reason or message  # the short form: what broke, without the advice

