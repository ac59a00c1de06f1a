"""meshd.artifacts.use: paths reach the workload's environment and command line."""

from meshd.artifacts.use import with_artifacts


def test_paths_fill_the_command_and_env_and_name_variables():
    command, env = with_artifacts(("run", "--model=${artifact:model}", "x"),
                                  {"LIB": "${artifact:py-libs}/lib", "MESHD_ARTIFACT_MODEL": "forged", "A": "b"},
                                  {"model": "/d/m", "py-libs": "/d/u"})
    assert command == ["run", "--model=/d/m", "x"]
    assert env == {"LIB": "/d/u/lib", "MESHD_ARTIFACT_MODEL": "/d/m", "MESHD_ARTIFACT_PY_LIBS": "/d/u", "A": "b"}
