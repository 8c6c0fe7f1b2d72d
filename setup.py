"""Thin setuptools entry for `python setup.py develop` (as MindSpeed-LLM users install); everything is declared
in pyproject.toml. Prefer `pip install -e .`."""

from setuptools import setup

setup()
