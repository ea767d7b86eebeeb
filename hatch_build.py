"""Hatch build hook: a wheel carries the top-level conf/ inside the package (metalearn/conf/), where
metalearn/confdir.py looks first; an editable install does not (it reads conf/ beside the package)."""

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class CustomBuildHook(BuildHookInterface):
    def initialize(self, version: str, build_data: dict) -> None:
        if self.target_name == "wheel" and version == "standard":
            build_data["force_include"]["conf"] = "metalearn/conf"
