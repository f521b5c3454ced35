"""Public path of the calibration data files (`featcal.io.data_files`)."""

from .io.data_files import INPUT_KEYS, CalibrationData, load_calibration_file, save_calibration_file

__all__ = ["INPUT_KEYS", "CalibrationData", "load_calibration_file", "save_calibration_file"]
