"""Example kinetoscope plugins, registered through the ``kinetoscope.plugins`` entry points in ``pyproject.toml``."""

from kinetoscope_plugin_example.patchers import TemporalDifferencePatcher
from kinetoscope_plugin_example.samplers import RectifiedFlowMidpoint

__all__ = ["RectifiedFlowMidpoint", "TemporalDifferencePatcher"]
