"""Checks of settings that the config (when it is read) and the statistics (when they run) both make."""

from __future__ import annotations


def check_split(calibration_fraction: float, part_2_fraction: float | None) -> None:
    """The held-out share in (0, 1) and calibration part 2 a smaller share of all rows."""
    if not 0 < calibration_fraction < 1:
        raise ValueError(f"calibration_fraction must be in (0, 1), got {calibration_fraction}")
    if part_2_fraction is not None and not 0 < part_2_fraction < calibration_fraction:
        raise ValueError(
            f"part_2_fraction must be in (0, calibration_fraction={calibration_fraction}), "
            f"got {part_2_fraction}"
        )
