#!/usr/bin/env python3
"""Checks the Grafana dashboards in ops/grafana/ against themselves and against the product.

    ops/grafana-check.py [DASHBOARD.json ...]     defaults to ops/grafana/*.json

No package validates a dashboard's JSON, so this does what matters for ours (stdlib only):
  - the top-level fields Grafana needs, with their types;
  - a `datasource` variable of type datasource (prometheus) that every panel and query uses;
  - panel ids unique; gridPos whole numbers inside the 24 columns; no two panels overlap;
  - every query target has a PromQL `expr`, with refIds unique in its panel;
  - every $variable used is defined (or one of Grafana's own, $__…);
  - every metric a query names is one the product registers in src/ (so renaming a metric
    breaks CI), with the suffix its type gets (_total for counters; _bucket, _sum and
    _count for histograms), or one of the RabbitMQ metrics in EXTERNAL_METRICS;
  - every label a query or legend names is one src/ sets, or a label Prometheus or the
    RabbitMQ exporter adds.
Prints every problem; exits 1 if there is one.
"""

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "src"
# Metrics the dashboard reads from RabbitMQ, not from the product: the rabbitmq_prometheus
# plugin's per-object metrics, or the standalone rabbitmq_exporter (which names unacked
# messages `..._unacknowledged`).
EXTERNAL_METRICS = {"rabbitmq_queue_messages_ready", "rabbitmq_queue_messages_unacked",
                    "rabbitmq_queue_messages_unacknowledged"}
# Labels added outside the product: by Prometheus's scrape, by histograms, by the exporter.
EXTERNAL_LABELS = {"job", "instance", "le", "queue", "vhost"}
SUFFIXES = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}
PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
                "group_left", "group_right", "inf", "nan"}
GROUPING = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)"
IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
COLUMNS = 24


def registered_metrics(source):
    """Exported metric names from the registrations in `source`: name -> kind (or None)."""
    metrics = {}
    for path in sorted(source.rglob("*.rs")):
        text = path.read_text()
        prefix = re.search(r'Registry::with_prefix\(\s*"([^"]+)"\s*\)', text)
        calls = re.finditer(
            r'\.register\(\s*"([a-zA-Z_:][a-zA-Z0-9_:]*)"\s*,\s*"(?:[^"\\]|\\.)*"\s*,\s*'
            r'(?:[A-Za-z_:<>, ]*::clone\(\s*&\s*)?([A-Za-z_][A-Za-z0-9_]*)', text)
        for call in calls:
            name = f"{prefix.group(1)}_{call.group(1)}" if prefix else call.group(1)
            metrics[name] = kind_of(call.group(2), text)
    return metrics


def kind_of(variable, text):
    """Counter, gauge or histogram, from the `let` or the struct field that types `variable`."""
    for pattern in (rf"\blet\s+(?:mut\s+)?{variable}\s*(?::[^=;]*)?=([^;]*);",
                    rf"\b{variable}\s*:\s*([^\n]*)"):
        for found in re.finditer(pattern, text):
            for kind in ("Histogram", "Counter", "Gauge"):
                if re.search(rf"\b{kind}\b", found.group(1)):
                    return kind.lower()
    return None


def source_labels(source):
    """Label names src/ sets: the keys given to the `label` and `labels2` helpers."""
    labels = set()
    for path in sorted(source.rglob("*.rs")):
        text = path.read_text()
        labels |= set(re.findall(r'\blabel\(\s*"(\w+)"', text))
        for first, second in re.findall(r'\blabels2\(\s*"(\w+)"\s*,[^,]*,\s*"(\w+)"', text):
            labels |= {first, second}
    return labels


def exported_names(registered):
    names = {}
    for name, kind in registered.items():
        suffixes = SUFFIXES[kind] if kind else sorted({s for v in SUFFIXES.values() for s in v})
        for suffix in suffixes:
            names[name + suffix] = name
    return names


def promql_names(expr):
    """(metric names, label names) a PromQL expression mentions."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    labels = set()
    for matchers in re.findall(r"\{([^}]*)\}", text):
        labels |= set(re.findall(rf"({IDENT})\s*(?:=~|!~|!=|=)", matchers))
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", text)
    for grouping in re.findall(GROUPING, text):
        labels |= set(re.findall(IDENT, grouping))
    text = re.sub(GROUPING, " ", text)
    text = re.sub(r"\$\{[^}]*\}|\$\w+", " ", text)
    # An identifier that is neither part of a number nor a function's name is a metric.
    metrics = {
        m.group(1)
        for m in re.finditer(r"(?<![\w.:])([A-Za-z_:][A-Za-z0-9_:]*)(?![A-Za-z0-9_:]|\s*\()", text)
        if m.group(1) not in PROMQL_WORDS
    }
    return metrics, labels


def variable_names(text):
    return {m.group(1) or m.group(2) or m.group(3)
            for m in re.finditer(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]", text)}


def query_text(query):
    return query.get("query", "") if isinstance(query, dict) else query or ""


class Checker:
    def __init__(self, path, registered, labels):
        self.path = path
        self.registered = registered
        self.exported = exported_names(registered)
        self.labels = labels
        self.problems = []
        self.used_variables = set()

    def fail(self, where, what):
        self.problems.append(f"{self.path}: {where}: {what}")

    def promql(self, where, expr):
        self.used_variables |= variable_names(expr)
        metrics, labels = promql_names(expr)
        for metric in sorted(metrics):
            if metric in self.exported or metric in EXTERNAL_METRICS:
                continue
            kind = self.registered.get(metric)
            if kind:
                self.fail(where, f"metric {metric} is a {kind}: Prometheus sees it as "
                                 + " or ".join(metric + s for s in SUFFIXES[kind]))
            else:
                self.fail(where, f"metric {metric} is not registered in src/ "
                                 "(nor one of the RabbitMQ metrics)")
        for label in sorted(labels - self.labels - EXTERNAL_LABELS):
            self.fail(where, f"label {label} is set nowhere in src/")

    def datasource(self, where, ref):
        uid = ref.get("uid") if isinstance(ref, dict) else ref
        if uid not in ("${datasource}", "$datasource"):
            self.fail(where, f"datasource {ref!r}, want the ${{datasource}} variable")

    def check(self, dashboard):
        for field, kind in (("uid", str), ("title", str), ("schemaVersion", int),
                            ("panels", list), ("templating", dict)):
            if not isinstance(dashboard.get(field), kind):
                self.fail("dashboard", f"{field} missing or not a {kind.__name__}")
                return
        defined = self.variables(dashboard["templating"].get("list", []))
        panels = self.panels(dashboard["panels"])
        for panel in panels:
            self.panel(panel)
        undefined = {v for v in self.used_variables if not v.startswith("__")} - defined
        for name in sorted(undefined):
            self.fail("dashboard", f"variable ${name} is used but not defined in templating")

    def variables(self, variables):
        names = [v.get("name") for v in variables]
        for name in {n for n in names if names.count(n) > 1}:
            self.fail("templating", f"variable {name} defined twice")
        source = [v for v in variables if v.get("name") == "datasource"]
        if not source or source[0].get("type") != "datasource" or source[0].get("query") != "prometheus":
            self.fail("templating", "no `datasource` variable of type datasource for prometheus")
        for variable in variables:
            if variable.get("type") != "query":
                continue
            where = f"variable {variable.get('name')}"
            self.datasource(where, variable.get("datasource"))
            query = query_text(variable.get("query"))
            call = re.fullmatch(rf"\s*label_values\((?:(.*),)?\s*({IDENT})\s*\)\s*", query)
            if call:
                self.promql(where, call.group(1) or "")
                if call.group(2) not in self.labels | EXTERNAL_LABELS:
                    self.fail(where, f"label {call.group(2)} is set nowhere in src/")
            else:
                self.promql(where, query)
        return set(names)

    def panels(self, top):
        """All panels, after checking ids and layout; a collapsed row's panels are laid out
        apart from the others."""
        nested = [p for row in top if row.get("collapsed") for p in row.get("panels", [])]
        everything = top + nested
        ids = [p.get("id") for p in everything]
        for bad in sorted({i for i in ids if ids.count(i) > 1 or not isinstance(i, int)}, key=str):
            self.fail(f"panel id {bad}", "not a unique integer")
        self.layout(top)
        for row in top:
            if row.get("collapsed"):
                self.layout(row.get("panels", []))
        return everything

    def layout(self, panels):
        boxes = []
        for panel in panels:
            where = f"panel {panel.get('id')} ({panel.get('title')!r})"
            grid = panel.get("gridPos", {})
            x, y, w, h = (grid.get(k) for k in "xywh")
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (x, y, w, h)):
                self.fail(where, f"gridPos {grid} must have whole numbers x, y, w and h")
                continue
            if x < 0 or y < 0 or w < 1 or h < 1 or x + w > COLUMNS:
                self.fail(where, f"gridPos {grid} is outside the {COLUMNS} columns")
            for other, (ox, oy, ow, oh) in boxes:
                if x < ox + ow and ox < x + w and y < oy + oh and oy < y + h:
                    self.fail(where, f"overlaps {other}")
            boxes.append((where, (x, y, w, h)))

    def panel(self, panel):
        where = f"panel {panel.get('id')} ({panel.get('title')!r})"
        self.used_variables |= variable_names(panel.get("title", ""))
        if panel.get("type") == "row":
            return
        self.datasource(where, panel.get("datasource"))
        targets = panel.get("targets", [])
        if not targets:
            self.fail(where, "has no query targets")
        refs = [t.get("refId") for t in targets]
        for ref in {r for r in refs if refs.count(r) > 1}:
            self.fail(where, f"refId {ref} used twice")
        for target in targets:
            at = f"{where} target {target.get('refId')}"
            if not isinstance(target.get("expr"), str) or not target["expr"].strip():
                self.fail(at, "has no expr")
                continue
            if "datasource" in target:
                self.datasource(at, target["datasource"])
            self.promql(at, target["expr"])
            legend = target.get("legendFormat", "")
            for label in sorted(set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
                                - self.labels - EXTERNAL_LABELS):
                self.fail(at, f"legend label {label} is set nowhere in src/")


def main():
    paths = [Path(p) for p in sys.argv[1:]] or sorted((ROOT / "ops" / "grafana").glob("*.json"))
    registered = registered_metrics(SOURCE)
    labels = source_labels(SOURCE)
    if not registered or not labels:
        sys.exit(f"grafana-check: found no metric registrations or labels under {SOURCE}; "
                 "teach ops/grafana-check.py how src/ registers them now")
    problems = []
    for path in paths:
        checker = Checker(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path,
                          registered, labels)
        try:
            checker.check(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as err:
            checker.fail("file", str(err))
        problems += checker.problems
        if not checker.problems:
            print(f"ok    {checker.path}")
    for problem in problems:
        print(f"FAIL  {problem}")
    if problems:
        sys.exit(1)
    print(f"Grafana dashboards: {len(paths)} checked against {len(registered)} metrics in src/")


if __name__ == "__main__":
    main()
