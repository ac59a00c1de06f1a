"""How a workload sees its artifacts: their paths in its environment and command line.

Invariants:
- Pure: no I/O.
- Each artifact NAME is given as MESHD_ARTIFACT_<NAME> (upper case, `-` as `_`), which the
  app's own env cannot set, and every `${artifact:NAME}` in the command and env values is
  replaced by its path. The spec parser already refused a use of a name the app lacks.
"""

from __future__ import annotations

from typing import Mapping

from meshd.spec import ARTIFACT_REF_RE, artifact_env_name


def with_artifacts(command: tuple[str, ...], env: Mapping[str, str],
                   paths: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """The command and environment a workload gets, given each artifact's path by name."""
    def fill(text: str) -> str:
        return ARTIFACT_REF_RE.sub(lambda m: paths.get(m.group(1), m.group(0)), text)

    filled = {key: fill(value) for key, value in env.items()}
    filled.update({artifact_env_name(name): path for name, path in paths.items()})
    return [fill(arg) for arg in command], filled
