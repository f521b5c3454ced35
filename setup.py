"""Build script. Metadata lives in pyproject.toml; compiled extensions (featcal._C) plug in here."""

from setuptools import setup

setup()
