"""The alert rules (deploy/prometheus/alerts.yml) pass promtool's checks and unit tests; those tests bite (an alert
that never fires, or always fires, fails them); every metric the rules read is one the package exports; every
alert has its severity, annotations and a runbook section that exists.

promtool comes from Debian's `prometheus` package (.ci/run installs it). These tests fail when it is missing:
they never skip."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from dynamiq_redis_ckpt.metrics import ERROR_KINDS, FLEET_STATES, OPERATIONS, catalogue

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
RUNBOOK = ROOT / "docs" / "operating" / "alerts.md"

CATALOGUE = catalogue()  # what the package exports: built from its own collectors
PROMETHEUS_OWN = {"up"}  # series Prometheus itself writes for every target
# The label values the catalogue allows, for the labels the rules select on.
LABEL_VALUES = {"operation": set(OPERATIONS), "state": set(FLEET_STATES), "kind": set(ERROR_KINDS)}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                "offset", "inf", "nan"}  # fmt: skip


def promtool() -> str:
    found = shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None)
    assert found, "promtool is missing: apt-get install prometheus (.ci/run does)"
    return found


def alerts() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers left once strings, label matchers, ranges,
    grouping clauses, function calls, keywords and numbers are taken out."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"(?<![A-Za-z0-9_:])\d[\d.]*(?:[eE][+-]?\d+)?", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        rest = text[match.end():].lstrip()
        if rest.startswith("("):  # a function or an aggregation
            continue
        if match.group().lower() not in PROMQL_WORDS:
            names.add(match.group())
    return names


def selected_label_values(expr: str) -> list[tuple[str, str, str]]:
    """(metric, label, value) for every equality or regex matcher; a regex's alternatives are split."""
    found = []
    for metric, matchers in re.findall(r"([A-Za-z_:][A-Za-z0-9_:]*)\{([^}]*)\}", expr):
        for label, op, value in re.findall(r'(\w+)\s*(=~|=)\s*"([^"]*)"', matchers):
            for one in value.split("|") if op == "=~" else [value]:
                found.append((metric, label, one))
    return found


def test_promtool_checks_the_rule_file():
    run = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in run.stdout


def test_promtool_unit_tests_pass():
    run = subprocess.run([promtool(), "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS" in run.stdout


def test_every_alert_has_a_firing_and_a_silent_case_in_the_unit_tests():
    cases: dict[str, set[bool]] = {}
    for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for case in test.get("alert_rule_test", []):
            fires = bool(case.get("exp_alerts"))
            cases.setdefault(case["alertname"], set()).add(fires)
            for alert in case.get("exp_alerts") or []:
                assert alert.get("exp_annotations"), f"{test['name']}: a firing case checks its annotations"
    names = [rule["alert"] for rule in alerts()]
    assert len(names) == len(set(names)), "alert names are unique"
    assert {name: cases.get(name) for name in names} == {name: {True, False} for name in names}


def _failures_with_every_alert_replaced(tmp_path: Path, expr: str) -> set[str]:
    """Run the unit tests against alerts.yml with every alert's expression replaced by ``expr``: the names of the
    alerts some case failed for."""
    mutated = yaml.safe_load(RULES.read_text())
    for group in mutated["groups"]:
        for rule in group["rules"]:
            rule["expr"] = expr
    folder = tmp_path / f"mutated-{len(list(tmp_path.iterdir()))}"
    folder.mkdir()
    (folder / "alerts.yml").write_text(yaml.safe_dump(mutated))
    (folder / "alerts_test.yml").write_text(RULE_TESTS.read_text())
    run = subprocess.run([promtool(), "test", "rules", "alerts_test.yml"], cwd=folder,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode != 0, "the unit tests passed against rules that ignore every series"
    return set(re.findall(r"alertname: (\w+), time:", run.stdout + run.stderr))


def test_the_unit_tests_fail_for_each_alert_that_never_fires_or_always_fires(tmp_path):
    """Every alert replaced by one that never fires, then by one that fires all the time (with the worker's job
    label): for each alert some case must fail both times."""
    names = {rule["alert"] for rule in alerts()}
    assert _failures_with_every_alert_replaced(tmp_path, "vector(1) > 2") == names
    always = 'label_replace(vector(1), "job", "dynamiq-redis-ckpt-worker", "", "")'
    assert _failures_with_every_alert_replaced(tmp_path, always) == names


def test_every_metric_the_rules_read_is_exported_by_the_package():
    used = set()
    for rule in alerts():
        names = metric_names(rule["expr"])
        assert names, f"no metric found in {rule['alert']}'s expression"
        used |= names
        for name in names:
            if name in PROMETHEUS_OWN:
                continue
            if name.endswith("_bucket"):
                assert CATALOGUE.get(name[: -len("_bucket")]) == "histogram", f"{rule['alert']}: {name}"
            else:
                assert name in CATALOGUE, f"{rule['alert']} reads {name}, which the package does not export"
                assert CATALOGUE[name] != "histogram", f"{rule['alert']} reads histogram {name} without a suffix"
            if name.endswith("_total"):
                assert re.search(rf"(rate|increase)\(\s*{name}\b", rule["expr"]), f"counter {name} used raw"
        for metric, label, value in selected_label_values(rule["expr"]):
            if label in LABEL_VALUES:
                assert value in LABEL_VALUES[label], f"{rule['alert']}: {metric}{{{label}={value!r}}} never exists"
    assert "dynamiq_ckpt_fleet_oldest_orphan_age_seconds" in used and "up" in used


def test_the_metric_name_parser_finds_names_and_only_names():
    expr = ('histogram_quantile(0.99, sum by (namespace, job, le) (rate(a_bucket{operation="save"}[5m]))) > 0.25'
            ' or max without (instance) (b) == 0 unless on (job) absent(up{job="x"}) and time() - c > 1e3')  # fmt: skip
    assert metric_names(expr) == {"a_bucket", "b", "up", "c"}


def test_every_alert_has_severity_for_annotations_and_a_runbook_section():
    anchors = set()
    for heading in re.findall(r"^#+ (.+)$", RUNBOOK.read_text(), flags=re.M):
        anchors.add(re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-"))
    for rule in alerts():
        name = rule["alert"]
        assert re.fullmatch(r"DynamiqCkpt[A-Za-z]+", name)
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        assert re.fullmatch(r"\d+[smh]", rule["for"]), name
        notes = rule["annotations"]
        assert set(notes) == {"summary", "description", "runbook_url"}, name
        assert notes["summary"].strip() and notes["description"].strip(), name
        page, _, anchor = notes["runbook_url"].partition("#")
        assert (ROOT / page).resolve() == RUNBOOK.resolve(), name
        assert anchor == name.lower() and anchor in anchors, f"{name}: no section #{anchor} in {RUNBOOK.name}"


@pytest.mark.parametrize("rule", alerts(), ids=lambda r: r["alert"])
def test_only_the_worker_down_alert_names_a_job(rule):
    selects_job = 'job=' in rule["expr"].replace(" ", "")
    assert selects_job == (rule["alert"] == "DynamiqCkptWorkerDown")
    if selects_job:
        assert set(re.findall(r'job="([^"]*)"', rule["expr"])) == {"dynamiq-redis-ckpt-worker"}
