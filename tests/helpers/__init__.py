"""Helpers shared by the test modules: generated images and models, CLI runners, synthetic CPUs.

Test modules import these (``from tests.helpers.<module> import …``), never each other; shared fixtures live
in tests/conftest.py.
"""
