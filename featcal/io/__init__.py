"""Files: safetensors reading and writing, output checkpoints, atomic files, offloaded streams,
calibration data files and the user cache."""
