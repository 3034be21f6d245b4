#!/usr/bin/python3
"""Checks that every kvserve metric that deploy/ refers to is one the server exports.

Reads a Prometheus text exposition (a file, or a live server's http://HOST:PORT/metrics) and
every YAML and JSON file under --deploy (alert rules, Grafana dashboards, the HPA and the
Prometheus Adapter rule), and fails when
  - a referenced series is not in the exposition (histograms are referenced through their
    _bucket/_sum/_count series, never by the family name alone),
  - a selector matches on a label that the series does not have,
  - a family of --design (the metric table of docs/design.md section 6) is missing from the
    exposition, has another type, or has other label names.
"""
import argparse
import json
import pathlib
import re
import sys
import urllib.request

import yaml

# Added by Prometheus at scrape time (job, instance) or by the Operator's service discovery
# (namespace, pod, ...), so never in the exposition itself.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "container", "endpoint"}
METRIC_RE = re.compile(r"(?<![\w:])kvserve_\w+(?![\w:])")
SELECTOR_RE = re.compile(r"(?<![\w:])(kvserve_\w+)\s*\{([^}]*)\}")
MATCHER_RE = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")
SAMPLE_RE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s")
LABEL_RE = re.compile(r'(\w+)="(?:[^"\\]|\\.)*"')
# The metric table of docs/design.md lies between these two comments; each row is
# | `family` | type | `label` ... | what |.
DESIGN_BEGIN = "<!-- metric families: begin"
DESIGN_END = "<!-- metric families: end -->"
DESIGN_ROW_RE = re.compile(r"^\|\s*`(kvserve_\w+)`\s*\|\s*(\w+)\s*\|([^|]*)\|")


def read_text(source):
    if re.match(r"https?://", source):
        with urllib.request.urlopen(source, timeout=10) as response:
            return response.read().decode()
    return pathlib.Path(source).read_text()


def parse_exposition(text):
    """Returns ({family: type}, {series name: label names})."""
    families, series = {}, {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(None, 3)
            families[name] = kind.strip()
        elif line and not line.startswith("#"):
            match = SAMPLE_RE.match(line)
            if match:
                labels = set(LABEL_RE.findall(match.group(2) or ""))
                series.setdefault(match.group(1), set()).update(labels)
    # A family announced by TYPE but without samples yet (a labelled counter before its first
    # increment) still names its series.
    suffixes = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("", "_sum", "_count")}
    for name, kind in families.items():
        for suffix in suffixes.get(kind, ("",)):
            series.setdefault(name + suffix, set())
    for name, kind in families.items():
        if kind == "histogram":
            series[name + "_bucket"].add("le")
    return families, series


def parse_design(text, source):
    """Returns {family: (type, label names)} from the metric table of docs/design.md."""
    begin, end = text.find(DESIGN_BEGIN), text.find(DESIGN_END)
    if begin < 0 or end < begin:
        sys.exit(f"{source}: no metric table between '{DESIGN_BEGIN}' and '{DESIGN_END}'")
    families = {}
    for line in text[begin:end].splitlines():
        match = DESIGN_ROW_RE.match(line)
        if match:
            families[match.group(1)] = (match.group(2), set(re.findall(r"`(\w+)`", match.group(3))))
    if not families:
        sys.exit(f"{source}: the metric table has no `kvserve_*` rows")
    return families


def strings_in(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings_in(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings_in(value)


def deploy_strings(deploy_dir):
    for path in sorted(deploy_dir.rglob("*")):
        if path.suffix in (".yml", ".yaml"):
            docs = list(yaml.safe_load_all(path.read_text()))
        elif path.suffix == ".json":
            docs = [json.loads(path.read_text())]
        else:
            continue
        for doc in docs:
            for text in strings_in(doc):
                yield path, text


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--metrics", required=True, help="exposition text: a file or an http(s) URL")
    parser.add_argument("--design", required=True, help="docs/design.md (its section 6 metric table)")
    parser.add_argument("--deploy", required=True, type=pathlib.Path, help="the deploy/ directory")
    args = parser.parse_args()

    families, series = parse_exposition(read_text(args.metrics))
    design_families = parse_design(read_text(args.design), args.design)
    errors = []

    for name, (kind, labels) in sorted(design_families.items()):
        if name not in families:
            errors.append(f"{args.metrics}: {name} ({kind}) of {args.design} is missing")
        elif families[name] != kind:
            errors.append(f"{args.metrics}: {name} is a {families[name]}, {args.design} says {kind}")
        else:
            # A histogram's own labels are those of its _count series (_bucket adds le).
            exported = series.get(name + "_count" if kind == "histogram" else name, set())
            if exported != labels:
                errors.append(f"{args.metrics}: {name} has labels {sorted(exported)}, "
                              f"{args.design} says {sorted(labels)}")

    referenced = set()
    for path, text in deploy_strings(args.deploy):
        for name in METRIC_RE.findall(text):
            referenced.add(name)
            if name not in series:
                hint = " (a histogram: use _bucket, _sum or _count)" if families.get(name) == "histogram" else ""
                errors.append(f"{path}: {name} is not exported{hint}")
        for name, matchers in SELECTOR_RE.findall(text):
            for label in MATCHER_RE.findall(matchers):
                if name in series and label not in series[name] | TARGET_LABELS:
                    errors.append(f"{path}: {name} has no label {label!r}")

    errors = list(dict.fromkeys(errors))  # a name repeated in one file is one error
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    print(f"{len(referenced)} metric names referenced under {args.deploy}, {len(families)} families "
          f"in {args.metrics}, {len(design_families)} families in {args.design}: {len(errors)} errors")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
