"""App spec parsing: every bad key is refused with its dotted path; valid specs round-trip."""

from __future__ import annotations

import copy
import dataclasses
import pickle
import string
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshd.spec import (
    KNOWN_ARCHES,
    LABEL_KEY_RE,
    MAX_COMMAND_ARGS,
    MAX_ENV_VARS,
    MAX_LABELS,
    MAX_MEMORY_MB,
    MAX_PIDS,
    MAX_SPEC_TEXT_CHARS,
    MIN_CPU,
    MIN_MEMORY_MB,
    NAME_RE,
    SpecError,
    parse_app_dict,
    parse_app_toml,
    spec_digest,
    spec_to_dict,
    spec_to_toml,
)
from meshd.state import AppSpec, ArtifactRef, Constraints, ResourceRequest, RolloutPlan, UpdatePolicy, Wave
from meshd.state import HealthCheck as HealthSpec

FULL_TOML = """
[app]
name = "vibration-monitor"
replicas = 3
command = ["python3", "-m", "http.server", "0"]
sites = ["factory-a"]
env = { MODE = "edge" }

[app.constraints]
arch = ["x86_64", "aarch64"]
labels = { line = "1" }

[app.resources]
cpu = 0.25
memory_mb = 64

[app.restart]
policy = "on-failure"
"""


def minimal(**app: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"name": "web", "replicas": 2, "command": ["sleep", "60"]}
    base.update(app)
    return {"app": base}


def test_contract_example_parses_to_every_field() -> None:
    spec = parse_app_toml(FULL_TOML)
    assert spec == AppSpec(
        name="vibration-monitor",
        replicas=3,
        command=("python3", "-m", "http.server", "0"),
        sites=("factory-a",),
        env={"MODE": "edge"},
        constraints=Constraints(arch=("x86_64", "aarch64"), labels={"line": "1"}),
        resources=ResourceRequest(cpu=0.25, memory_mb=64),
        restart_policy="on-failure",
    )


@pytest.mark.parametrize("health, key, reason", [
    ({"kind": "tcp"}, "app.health.port", "is required for a tcp check"),
    ({"kind": "http", "port": 0}, "app.health.port", "must be a port from 1 to 65535, got 0"),
    ({"kind": "http", "port": 80, "path": "healthz"}, "app.health.path", "must be a URL path starting with '/'"),
    ({"kind": "exec"}, "app.health.command", "is required for an exec check"),
    ({"kind": "exec", "command": []}, "app.health.command", "must not be empty"),
    ({"kind": "process", "port": 80}, "app.health.port", "is not used by a process check"),
    ({"kind": "udp"}, "app.health.kind", "must be one of process, tcp, http, exec"),
    ({"interval_s": 0}, "app.health.interval_s", "must be a number of seconds from 0.1 to 3600"),
    ({"interval_s": 5, "timeout_s": 6}, "app.health.timeout_s", "from 0.01 to 5"),
    ({"failures": 0}, "app.health.failures", "must be a whole number from 1 to 100"),
    ({"grace_s": -1}, "app.health.grace_s", "must be a number of seconds from 0 to 86400"),
    ({"kinds": "tcp"}, "app.health.kinds", "unknown key"),
])
def test_a_bad_health_check_is_refused_with_its_key(health: dict, key: str, reason: str) -> None:
    with pytest.raises(SpecError) as e:
        parse_app_dict({"app": {"name": "a", "command": ["x"], "health": health}})
    assert e.value.key == key and reason in e.value.reason


@pytest.mark.parametrize("update, key, reason", [
    ({"canary": 4}, "app.update.canary", "must be at most app.replicas (3), got 4"),
    ({"max_parallel": 0}, "app.update.max_parallel", "must be a whole number from 1 to 1000, got 0"),
    ({"min_healthy_s": -1}, "app.update.min_healthy_s", "must be a number of seconds from 0 to 604800"),
    ({"healthy_deadline_s": 0}, "app.update.healthy_deadline_s", "from 0.1 to 604800"),
    ({"min_healthy_s": 700, "progress_deadline_s": 600}, "app.update.progress_deadline_s",
     "must be at least app.update.min_healthy_s (700)"),
    ({"auto_revert": "yes"}, "app.update.auto_revert", "must be true or false"),
    ({"auto_promote": 1}, "app.update.auto_promote", "must be true or false"),
    ({"keep_versions": 0}, "app.update.keep_versions", "must be a whole number from 1 to 100"),
    ({"maxParallel": 2}, "app.update.maxParallel", "unknown key"),
    ("fast", "app.update", "must be a table"),
])
def test_a_bad_update_policy_is_refused_with_its_key(update: Any, key: str, reason: str) -> None:
    with pytest.raises(SpecError) as e:
        parse_app_dict({"app": {"name": "a", "replicas": 3, "command": ["x"], "update": update}})
    assert e.value.key == key and reason in e.value.reason


SITED = {"name": "a", "command": ["x"], "sites": ["pilot", "north", "south"]}


@pytest.mark.parametrize("rollout, key, reason", [
    ({"waves": [{"sites": ["east"]}]}, "app.rollout.waves[0].sites[0]", "names site 'east', which app.sites does not"),
    ({"waves": [{"percent": 0}]}, "app.rollout.waves[0].percent", "must be a whole number from 1 to 100, got 0"),
    ({"waves": [{"percent": 101}]}, "app.rollout.waves[0].percent", "from 1 to 100, got 101"),
    ({"waves": [{"percent": 50}, {"percent": 20}]}, "app.rollout.waves[1].percent", "must not be below an earlier"),
    ({"waves": [{"sites": ["pilot"], "percent": 10}]}, "app.rollout.waves[0]", "exactly one of sites"),
    ({"waves": [{"soak_s": 5}]}, "app.rollout.waves[0]", "exactly one of sites"),
    ({"waves": [{"sites": ["pilot"]}, {"sites": ["north", "pilot"]}]}, "app.rollout.waves[1].sites[1]",
     "already in app.rollout.waves[0]"),
    ({"waves": [{"sites": []}]}, "app.rollout.waves[0].sites", "must name at least one site"),
    ({"waves": [{"percent": 10, "soak_s": -1}]}, "app.rollout.waves[0].soak_s", "must be a number of seconds"),
    ({"waves": []}, "app.rollout.waves", "must have from 1 to 16 waves, got 0"),
    ({"waves": [{"percent": 100}] * 17}, "app.rollout.waves", "got 17"),
    ({}, "app.rollout.waves", "is required"),
    ({"waves": [{"percent": 100}], "abort_failed_percent": 101}, "app.rollout.abort_failed_percent",
     "from 0 to 100"),
    ({"waves": [{"percent": 100, "pause": True}]}, "app.rollout.waves[0].pause", "unknown key"),
    ({"waves": [{"percent": 100}], "phases": 2}, "app.rollout.phases", "unknown key"),
])
def test_a_bad_rollout_is_refused_with_its_key(rollout: Any, key: str, reason: str) -> None:
    with pytest.raises(SpecError) as e:
        parse_app_dict({"app": SITED | {"rollout": rollout}})
    assert e.value.key == key and reason in e.value.reason


def test_a_rollout_needs_the_sites_it_goes_across() -> None:
    with pytest.raises(SpecError) as e:
        parse_app_dict({"app": {"name": "a", "command": ["x"], "rollout": {"waves": [{"percent": 100}]}}})
    assert e.value.key == "app.rollout" and "needs app.sites" in e.value.reason


def test_the_contract_rollout_parses_and_reads_back() -> None:
    text = """
[app]
name = "detector"
command = ["serve"]
sites = ["pilot", "a", "b", "c"]

[app.rollout]
waves = [{ sites = ["pilot"], soak_s = 600 }, { percent = 25, soak_s = 3600 }, { percent = 100 }]
abort_failed_percent = 20
"""
    spec = parse_app_toml(text)
    assert spec.rollout == RolloutPlan(waves=(Wave(sites=("pilot",), soak_s=600.0), Wave(percent=25, soak_s=3600.0),
                                              Wave(percent=100)), abort_failed_percent=20)
    assert parse_app_toml(spec_to_toml(spec)) == spec


def test_an_update_policy_with_its_defaults() -> None:
    spec = parse_app_dict({"app": {"name": "a", "command": ["x"], "update": {"canary": 1}}})
    assert spec.update == UpdatePolicy(max_parallel=1, canary=1, min_healthy_s=10.0, healthy_deadline_s=300.0,
                                       progress_deadline_s=600.0, auto_revert=True, auto_promote=False,
                                       keep_versions=10)
    assert spec_to_dict(spec)["app"]["update"] == {"canary": 1}  # defaults are left out


def test_a_spec_digest_changes_with_the_spec_only() -> None:
    a = parse_app_toml('[app]\nname = "a"\ncommand = ["x"]\n')
    assert spec_digest(a) == spec_digest(parse_app_toml('[app]\ncommand = ["x"]\nname = "a"\n'))
    assert spec_digest(a) != spec_digest(parse_app_toml('[app]\nname = "a"\ncommand = ["y"]\n'))
    assert spec_digest(a).startswith("sha256:") and len(spec_digest(a)) == 71


def test_a_health_check_with_its_defaults() -> None:
    spec = parse_app_dict({"app": {"name": "a", "command": ["x"], "health": {"kind": "http", "port": 8080}}})
    assert spec.health == HealthSpec(kind="http", port=8080, path="/", interval_s=10.0, timeout_s=2.0, failures=3,
                                     grace_s=0.0)
    assert parse_app_dict({"app": {"name": "a", "command": ["x"]}}).health == HealthSpec()  # running is healthy


def test_optional_keys_take_their_defaults() -> None:
    spec = parse_app_toml('[app]\nname = "a"\ncommand = ["true"]\n')
    assert spec == AppSpec(name="a", replicas=1, command=("true",))
    assert spec.restart_policy == "always"
    assert spec.resources == ResourceRequest(cpu=0.0, memory_mb=0)


def test_integer_cpu_becomes_float() -> None:
    spec = parse_app_dict(minimal(resources={"cpu": 2}))
    assert spec.resources.cpu == 2.0 and isinstance(spec.resources.cpu, float)


def test_bytes_input_is_decoded() -> None:
    assert parse_app_toml(FULL_TOML.encode()).name == "vibration-monitor"


@pytest.mark.parametrize(
    ("name", "doc", "key", "reason_part"),
    [
        ("no app table", {}, "app", "required"),
        ("unknown top-level key", {"app": minimal()["app"], "extra": 1}, "extra", "unknown key"),
        ("app not a table", {"app": [1]}, "app", "must be a table"),
        ("unknown app key", minimal(replica=3), "app.replica", "unknown key"),
        ("two unknown keys named", minimal(zz=1, aa=2), "app.aa", "aa, zz"),
        ("name missing", {"app": {"command": ["x"]}}, "app.name", "required"),
        ("name uppercase", minimal(name="Web"), "app.name", "lowercase"),
        ("name trailing dash", minimal(name="web-"), "app.name", "lowercase"),
        ("name too long", minimal(name="a" * 64), "app.name", "63"),
        ("name empty", minimal(name=""), "app.name", "lowercase"),
        ("name not a string", minimal(name=5), "app.name", "string"),
        ("replicas zero", minimal(replicas=0), "app.replicas", "from 1 to 1000"),
        ("replicas negative", minimal(replicas=-3), "app.replicas", "got -3"),
        ("replicas too many", minimal(replicas=1001), "app.replicas", "1000"),
        ("replicas bool", minimal(replicas=True), "app.replicas", "got true"),
        ("replicas float", minimal(replicas=2.0), "app.replicas", "integer"),
        ("replicas huge", minimal(replicas=2**70), "app.replicas", "integer"),
        ("replicas beyond text limit", minimal(replicas=10**5000), "app.replicas", "huge"),
        ("command missing", {"app": {"name": "a"}}, "app.command", "required"),
        ("command a string", minimal(command="sleep 60"), "app.command", "list of strings"),
        ("command empty", minimal(command=[]), "app.command", "not be empty"),
        ("command item not str", minimal(command=["sleep", 60]), "app.command[1]", "string"),
        ("command item empty", minimal(command=["sleep", ""]), "app.command[1]", "empty"),
        ("command NUL", minimal(command=["a\0b"]), "app.command[0]", "NUL"),
        ("command arg too long", minimal(command=["x" * 5000]), "app.command[0]", "4096"),
        ("command too many", minimal(command=["x"] * (MAX_COMMAND_ARGS + 1)), "app.command", "at most"),
        ("command too big", minimal(command=["x" * 4000] * 20), "app.command", "in all"),
        ("sites not a list", minimal(sites="a"), "app.sites", "list"),
        ("sites empty", minimal(sites=[]), "app.sites", "at least one"),
        ("site bad name", minimal(sites=["ok", "Not_OK"]), "app.sites[1]", "lowercase"),
        ("site duplicate", minimal(sites=["a", "a"]), "app.sites[1]", "twice"),
        ("site not str", minimal(sites=[1]), "app.sites[0]", "string"),
        ("env not a table", minimal(env=["A=1"]), "app.env", "table"),
        ("env bad key", minimal(env={"1A": "x"}), "app.env.1A", "variable name"),
        ("env key with dash", minimal(env={"A-B": "x"}), "app.env.A-B", "variable name"),
        ("env value not str", minimal(env={"A": 1}), "app.env.A", "string"),
        ("env value nested", minimal(env={"A": {"B": "c"}}), "app.env.A", "string"),
        ("env NUL", minimal(env={"A": "x\0"}), "app.env.A", "NUL"),
        ("env too many", minimal(env={f"V{i}": "" for i in range(MAX_ENV_VARS + 1)}), "app.env", "at most"),
        ("env value too big", minimal(env={"A": "x" * 40000}), "app.env.A", "at most"),
        ("env too big in all", minimal(env={f"V{i}": "x" * 30000 for i in range(3)}), "app.env", "in all"),
        ("constraints not a table", minimal(constraints=1), "app.constraints", "table"),
        ("constraints unknown", minimal(constraints={"os": "linux"}), "app.constraints.os", "unknown"),
        ("arch not a list", minimal(constraints={"arch": "x86_64"}), "app.constraints.arch", "list"),
        ("arch empty", minimal(constraints={"arch": []}), "app.constraints.arch", "at least one"),
        ("arch unknown", minimal(constraints={"arch": ["amd64"]}), "app.constraints.arch[0]", "one of"),
        ("arch duplicate", minimal(constraints={"arch": ["i686", "i686"]}), "app.constraints.arch[1]", "twice"),
        ("labels not table", minimal(constraints={"labels": ["a=b"]}), "app.constraints.labels", "table"),
        ("label bad key", minimal(constraints={"labels": {"-x": "1"}}), "app.constraints.labels.-x", "label key"),
        ("label key spaces", minimal(constraints={"labels": {"a b": "1"}}), 'app.constraints.labels."a b"', "label key"),
        ("label value int", minimal(constraints={"labels": {"line": 1}}), "app.constraints.labels.line", "string"),
        ("label value newline", minimal(constraints={"labels": {"k": "a\nb"}}), "app.constraints.labels.k", "control"),
        ("label value long", minimal(constraints={"labels": {"k": "v" * 300}}), "app.constraints.labels.k", "253"),
        (
            "labels too many",
            minimal(constraints={"labels": {f"k{i}": "" for i in range(MAX_LABELS + 1)}}),
            "app.constraints.labels",
            "at most",
        ),
        ("resources not a table", minimal(resources=2), "app.resources", "table"),
        ("resources unknown", minimal(resources={"gpu": 1}), "app.resources.gpu", "unknown"),
        ("resources memory typo", minimal(resources={"memory": 64}), "app.resources.memory", "unknown"),
        ("cpu zero", minimal(resources={"cpu": 0}), "app.resources.cpu", "from 0.01"),
        ("cpu below a quota", minimal(resources={"cpu": 0.005}), "app.resources.cpu", "smallest CPU quota"),
        ("memory below a start", minimal(resources={"memory_mb": 3}), "app.resources.memory_mb", "needs to start"),
        ("pids zero", minimal(resources={"pids": 0}), "app.resources.pids", "from 1"),
        ("devices not a table", minimal(resources={"devices": ["gpu"]}), "app.resources.devices", "table"),
        ("device count zero", minimal(resources={"devices": {"gpu": 0}}), "app.resources.devices.gpu", "from 1"),
        ("device count huge", minimal(resources={"devices": {"gpu": 65}}), "app.resources.devices.gpu", "to 64"),
        ("device kind odd", minimal(resources={"devices": {"GPU!": 1}}), "app.resources.devices.GPU!", "kind"),
        ("pids float", minimal(resources={"pids": 2.0}), "app.resources.pids", "integer"),
        ("pids too many", minimal(resources={"pids": MAX_PIDS + 1}), "app.resources.pids", "4194304"),
        ("cpu negative", minimal(resources={"cpu": -1.5}), "app.resources.cpu", "got -1.5"),
        ("cpu too many", minimal(resources={"cpu": 1024.5}), "app.resources.cpu", "1024"),
        ("cpu nan", minimal(resources={"cpu": float("nan")}), "app.resources.cpu", "nan"),
        ("cpu inf", minimal(resources={"cpu": float("inf")}), "app.resources.cpu", "inf"),
        ("cpu string", minimal(resources={"cpu": "1"}), "app.resources.cpu", "number"),
        ("cpu bool", minimal(resources={"cpu": True}), "app.resources.cpu", "true"),
        ("memory zero", minimal(resources={"memory_mb": 0}), "app.resources.memory_mb", "from 4"),
        ("memory float", minimal(resources={"memory_mb": 64.0}), "app.resources.memory_mb", "integer"),
        ("memory too big", minimal(resources={"memory_mb": MAX_MEMORY_MB + 1}), "app.resources.memory_mb", "from 4"),
        ("memory 2**63", minimal(resources={"memory_mb": 2**63}), "app.resources.memory_mb", "from 4"),
        ("restart not a table", minimal(restart="always"), "app.restart", "table"),
        ("restart unknown", minimal(restart={"delay": 1}), "app.restart.delay", "unknown"),
        ("restart policy bad", minimal(restart={"policy": "sometimes"}), "app.restart.policy", "always, on-failure, never"),
        ("restart policy not str", minimal(restart={"policy": 1}), "app.restart.policy", "one of"),
    ],
    ids=lambda v: v if isinstance(v, str) and " " in v else None,
)
def test_bad_key_is_refused_with_its_path(name: str, doc: dict, key: str, reason_part: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_app_dict(doc)
    assert caught.value.key == key
    assert reason_part in caught.value.reason
    assert str(caught.value) == f"{key}: {caught.value.reason}"
    assert "\n" not in str(caught.value)


def test_error_message_format() -> None:
    with pytest.raises(SpecError) as caught:
        parse_app_dict(minimal(replicas=-3))
    assert str(caught.value) == "app.replicas: must be an integer from 1 to 1000, got -3"
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    ("text", "reason_part"),
    [
        ("[app\nname = 1", "line"),
        ('[app]\nname = "a"\nname = "b"\n', ""),
        ("[app]\nreplicas = " + "9" * 5000, ""),
        ("x = " + "[" * 5000 + "]" * 5000, ""),
        ("#" + " " * MAX_SPEC_TEXT_CHARS, "at most"),
    ],
    ids=["syntax", "duplicate key", "huge int literal", "deep nesting", "too long"],
)
def test_bad_toml_is_a_spec_error_keyed_toml(text: str, reason_part: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_app_toml(text)
    assert caught.value.key == "toml"
    assert reason_part in caught.value.reason


def test_non_utf8_bytes_are_refused() -> None:
    with pytest.raises(SpecError) as caught:
        parse_app_toml(b"[app]\nname = '\xff'")
    assert caught.value.key == "toml"


def test_document_must_be_a_table() -> None:
    with pytest.raises(SpecError) as caught:
        parse_app_dict(["app"])  # type: ignore[arg-type]
    assert caught.value.key == "document"


def test_odd_keys_stay_on_one_line() -> None:
    with pytest.raises(SpecError) as caught:
        parse_app_dict(minimal(env={"A\nB": "x"}))
    assert caught.value.key == 'app.env."A\\nB"'
    assert "\n" not in str(caught.value)


def test_spec_error_pickles() -> None:
    err = SpecError("app.name", "is required")
    back = pickle.loads(pickle.dumps(err))
    assert (back.key, back.reason, str(back)) == ("app.name", "is required", "app.name: is required")


def test_parse_does_not_mutate_input() -> None:
    doc = minimal(env={"A": "1"}, constraints={"arch": ["x86_64"], "labels": {"a": "b"}})
    before = copy.deepcopy(doc)
    spec = parse_app_dict(doc)
    assert doc == before
    doc["app"]["env"]["A"] = "changed"
    assert spec.env == {"A": "1"}


# --- property tests ----------------------------------------------------------------
names = st.from_regex(NAME_RE, fullmatch=True)
label_keys = st.from_regex(LABEL_KEY_RE, fullmatch=True)
label_values = st.text(alphabet=st.characters(min_codepoint=0x20, blacklist_characters="\x7f"), max_size=40)
env_keys = st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_]{0,20}\Z")
no_nul = st.characters(blacklist_characters="\0", blacklist_categories=("Cs",))
args = st.text(alphabet=no_nul, min_size=1, max_size=30)


@st.composite
def health_checks(draw: st.DrawFn) -> HealthSpec:
    from meshd.state import HealthCheck as Check
    kind = draw(st.sampled_from(["process", "tcp", "http", "exec"]))
    interval = draw(st.floats(0.1, 3600))
    return Check(kind=kind, port=draw(st.integers(1, 65535)) if kind in ("tcp", "http") else 0,
                 path=draw(st.from_regex(r"\A/[A-Za-z0-9/_.?=-]{0,30}\Z")) if kind == "http" else "/",
                 command=tuple(draw(st.lists(args, min_size=1, max_size=4))) if kind == "exec" else (),
                 interval_s=interval, timeout_s=draw(st.floats(0.01, interval)),
                 failures=draw(st.integers(1, 100)), grace_s=draw(st.floats(0, 86400)))


@st.composite
def update_policies(draw: st.DrawFn, replicas: int) -> UpdatePolicy:
    min_healthy = draw(st.floats(0, 3600))
    return UpdatePolicy(max_parallel=draw(st.integers(1, 1000)), canary=draw(st.integers(0, replicas)),
                        min_healthy_s=min_healthy, healthy_deadline_s=draw(st.floats(0.1, 86400)),
                        progress_deadline_s=draw(st.floats(max(min_healthy, 0.1), 7 * 86400)),
                        auto_revert=draw(st.booleans()), auto_promote=draw(st.booleans()),
                        keep_versions=draw(st.integers(1, 100)))


@st.composite
def app_specs(draw: st.DrawFn) -> AppSpec:
    replicas = draw(st.integers(1, 1000))
    return AppSpec(
        name=draw(names),
        replicas=replicas,
        command=tuple(draw(st.lists(args, min_size=1, max_size=6))),
        sites=tuple(draw(st.lists(names, max_size=4, unique=True))),
        env=draw(st.dictionaries(env_keys, st.text(alphabet=no_nul, max_size=20), max_size=5)),
        constraints=Constraints(
            arch=tuple(draw(st.lists(st.sampled_from(KNOWN_ARCHES), unique=True, max_size=3))),
            labels=draw(st.dictionaries(label_keys, label_values, max_size=4)),
        ),
        resources=ResourceRequest(
            cpu=draw(st.just(0.0) | st.floats(MIN_CPU, 1024)),
            memory_mb=draw(st.just(0) | st.integers(MIN_MEMORY_MB, MAX_MEMORY_MB)),
            pids=draw(st.just(0) | st.integers(1, MAX_PIDS)),
            devices=tuple(sorted(draw(st.dictionaries(st.sampled_from(["gpu", "coral", "render", "npu-1"]),
                                                      st.integers(1, 64), max_size=3)).items())),
        ),
        restart_policy=draw(st.sampled_from(["always", "on-failure", "never"])),
        health=draw(st.just(HealthSpec()) | health_checks()),
        update=draw(st.just(UpdatePolicy()) | update_policies(replicas)),
        artifacts=tuple(draw(st.lists(artifact_refs(), max_size=3, unique_by=lambda a: a.name))),
    )


@st.composite
def artifact_refs(draw: st.DrawFn) -> ArtifactRef:
    pushed = draw(st.booleans())
    return ArtifactRef(name=draw(st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?\Z")),
                       digest="sha256:" + draw(st.from_regex(r"\A[0-9a-f]{64}\Z")) if pushed else "",
                       file="" if pushed else draw(st.from_regex(r"\A[a-z][a-z0-9/._-]{0,20}\Z")),
                       unpack=draw(st.booleans()))


@st.composite
def rollouts(draw: st.DrawFn, sites: tuple[str, ...]) -> RolloutPlan | None:
    if not sites or not draw(st.booleans()):
        return None
    named = draw(st.lists(st.sampled_from(sites), unique=True, max_size=len(sites)))
    waves = [Wave(sites=(site,), soak_s=draw(st.floats(0, 3600))) for site in named]
    for percent in sorted(draw(st.lists(st.integers(1, 100), max_size=3))):
        waves.append(Wave(percent=percent, soak_s=draw(st.floats(0, 3600))))
    if not waves:
        waves.append(Wave(percent=100))
    return RolloutPlan(waves=tuple(waves), abort_failed_percent=draw(st.integers(0, 100)))


@st.composite
def app_specs_with_rollouts(draw: st.DrawFn) -> AppSpec:
    spec = draw(app_specs())
    return dataclasses.replace(spec, rollout=draw(rollouts(spec.sites)))


@given(app_specs_with_rollouts())
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
def test_round_trip(spec: AppSpec) -> None:
    assert parse_app_dict(spec_to_dict(spec)) == spec


@given(app_specs_with_rollouts())
@settings(max_examples=50, suppress_health_check=[HealthCheck.too_slow])
def test_round_trip_through_toml_text(spec: AppSpec) -> None:
    assert parse_app_toml(spec_to_toml(spec)) == spec


junk_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**62, max_value=2**80)
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["x86_64", "always", "web", "A", "", "\0"])
    | st.binary(max_size=4)
    | st.datetimes()
)
junk = st.recursive(
    junk_leaves,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8) | st.sampled_from(["name", "cpu", "labels", "arch", "policy"]), inner, max_size=4),
    max_leaves=12,
)
app_keys = st.sampled_from(["name", "replicas", "command", "sites", "env", "constraints", "resources", "restart", "bogus"])


@given(st.dictionaries(app_keys, junk, max_size=8))
@settings(max_examples=300)
def test_junk_app_tables_raise_only_spec_error(app: dict[str, Any]) -> None:
    try:
        spec = parse_app_dict({"app": app})
    except SpecError as err:
        assert "\n" not in str(err)
    else:
        assert isinstance(spec, AppSpec)


@given(app_specs(), st.data())
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
def test_valid_spec_with_one_leaf_replaced_raises_only_spec_error(spec: AppSpec, data: st.DataObject) -> None:
    doc = spec_to_dict(spec)
    node: Any = doc
    while isinstance(node, dict) and node:
        key = data.draw(st.sampled_from(sorted(node)))
        if not isinstance(node[key], dict) or data.draw(st.booleans()):
            node[key] = data.draw(junk)
            break
        node = node[key]
    try:
        parse_app_dict(doc)
    except SpecError as err:
        assert "\n" not in str(err)


@given(st.text(alphabet=string.printable, max_size=200) | st.text(max_size=200))
@settings(max_examples=300)
def test_junk_text_raises_only_spec_error(text: str) -> None:
    try:
        parse_app_toml(text)
    except SpecError as err:
        assert "\n" not in str(err)


toml_fragments = st.sampled_from([
    "[app]", "name = ", '"web"', "replicas = ", "3", "command = ", '["x"]', "[app.resources]", "cpu = ",
    "1.5", "\n", "[", "]", "=", '"', "{", "}", ",", "-1", "1e999", "nan",
])


@given(st.lists(toml_fragments, max_size=30))
@settings(max_examples=300)
def test_junk_toml_fragments_raise_only_spec_error(parts: list[str]) -> None:
    try:
        parse_app_toml("".join(parts))
    except SpecError as err:
        assert "\n" not in str(err)


# --- [[app.artifact]] -----------------------------------------------------------------
DIGEST = "sha256:" + "ab" * 32


def test_artifacts_are_parsed_and_named_for_the_environment():
    spec = parse_app_toml(f"""
[app]
name = "detector"
command = ["/usr/bin/run", "--model", "${{artifact:model}}"]
env = {{ BUNDLE = "${{artifact:py-libs}}/lib" }}
[[app.artifact]]
name = "model"
file = "models/detector.onnx"
[[app.artifact]]
name = "py-libs"
digest = "{DIGEST}"
unpack = true
""")
    assert spec.artifacts == (ArtifactRef("model", file="models/detector.onnx"),
                              ArtifactRef("py-libs", digest=DIGEST, unpack=True))
    from meshd.spec import artifact_env_name
    assert artifact_env_name("py-libs") == "MESHD_ARTIFACT_PY_LIBS"


@pytest.mark.parametrize("artifact, key, reason", [
    ('name = "m"', "app.artifact[0]", "exactly one of file"),
    (f'name = "m"\nfile = "a"\ndigest = "{DIGEST}"', "app.artifact[0]", "exactly one of file"),
    ('name = "M"\nfile = "a"', "app.artifact[0].name", "lowercase"),
    ('name = "m"\ndigest = "sha256:xyz"', "app.artifact[0].digest", "64 lowercase hex"),
    ('name = "m"\nfile = "a"\nunpack = "yes"', "app.artifact[0].unpack", "true or false"),
    ('name = "m"\nfile = "a"\nmode = 1', "app.artifact[0].mode", "unknown key"),
])
def test_bad_artifacts_are_refused_with_their_key(artifact, key, reason):
    with pytest.raises(SpecError) as e:
        parse_app_toml(f'[app]\nname = "x"\ncommand = ["x"]\n[[app.artifact]]\n{artifact}\n')
    assert e.value.key == key and reason in e.value.reason


def test_a_use_of_an_unknown_artifact_is_refused():
    with pytest.raises(SpecError) as e:
        parse_app_toml('[app]\nname = "x"\ncommand = ["x", "${artifact:nope}"]\n'
                       '[[app.artifact]]\nname = "m"\nfile = "a"\n')
    assert e.value.key == "app.command[1]" and "names no artifact" in e.value.reason
    with pytest.raises(SpecError, match="another artifact"):
        parse_app_toml('[app]\nname = "x"\ncommand = ["x"]\n[[app.artifact]]\nname = "a-b"\nfile = "a"\n'
                       '[[app.artifact]]\nname = "a_b"\nfile = "b"\n')
