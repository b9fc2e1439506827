"""Plain Kubernetes manifests for users without Helm, generated from the chart charts/tdm.

Renders the chart with Helm's own template engine (helm-python-sdk; no helm binary, no cluster) with its
default values, release "tdm" in namespace "tdm", and writes one file per chart template into k8s/:

    python k8s/generate.py           # rewrite k8s/*.yaml
    python k8s/generate.py --check   # exit 1 naming the stale files when k8s/ differs from a fresh render
"""
import argparse
import re
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
CHART = HERE.parent / "charts" / "tdm"
RELEASE = NAMESPACE = "tdm"

HEADER = """\
# GENERATED from the Helm chart charts/tdm (templates/{template}) with its default values, release
# "{release}", namespace "{namespace}". Do not edit here: change the chart and run `python k8s/generate.py`
# (`python k8s/generate.py --check` and tests/test_k8s_manifests.py fail while this file is stale).

"""

# Helm's bookkeeping -> plain-manifest metadata. Edits of the rendered text rather than a YAML round trip,
# so the chart's comments survive; _check_plain() catches a template layout these patterns miss.
_EDITS = [
    # helm.sh/resource-policy only tells `helm uninstall` to keep the PVC; kubectl deletes what it is told.
    # helm.sh/hook*: the MLflow bootstrap Job is a post-install hook; applied with the rest, it waits for
    # the MLflow server itself.
    (re.compile(r"(?m)^[ \t]*helm\.sh/(chart|resource-policy|hook|hook-delete-policy|hook-weight): .*\n"), ""),
    (re.compile(r"(?m)^( *)annotations:\n(?!\1 )"), ""),          # an annotations map left empty by that
    (re.compile(r"(?m)^([ \t]*app\.kubernetes\.io/managed-by:) Helm$"), r"\1 kubectl"),
    # The objects name their namespace (the MLflow URIs and allowed hosts are rendered for it), so
    # `kubectl apply -f k8s/` needs no -n.
    (re.compile(r"(?m)^metadata:\n  name: .*\n"), lambda m: f"{m.group(0)}  namespace: {NAMESPACE}\n"),
]


def _plain(text: str) -> str:
    for pattern, replacement in _EDITS:
        text = pattern.sub(replacement, text)
    return text


def _check_plain(template: str, docs: list[dict]) -> None:
    for doc in docs:
        meta = doc["metadata"]
        if meta.get("namespace") != NAMESPACE or "helm" in yaml.safe_dump(meta).lower():
            raise SystemExit(f"k8s/generate.py: templates/{template} {doc['kind']}/{meta['name']} still has Helm "
                             f"metadata or no namespace after the edits; adapt _EDITS to the chart")


def render() -> dict[str, str]:
    """{file name: text} of the plain manifests, one file per chart template that renders objects."""
    import helm_python as helm  # a test extra: pip install -c constraints.txt -e ".[test]"

    chart = helm.Chart.load(CHART)
    try:
        rendered = chart.render({}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    finally:
        chart.close()
    files = {}
    for path, text in sorted(rendered.items()):
        template = path.split("/templates/", 1)[1]
        if not template.endswith(".yaml"):           # NOTES.txt
            continue
        body = _plain(text).strip("\n") + "\n"
        docs = [d for d in yaml.safe_load_all(body) if d]
        if not docs:                                 # validate.yaml, or a template its values switch off
            continue
        _check_plain(template, docs)
        files[template] = HEADER.format(template=template, release=RELEASE, namespace=NAMESPACE) + body
    return files


def stale(directory: Path = HERE, fresh: dict[str, str] | None = None) -> list[str]:
    """Names of the *.yaml files in `directory` that differ from a fresh render, are missing or are extra."""
    fresh = render() if fresh is None else fresh
    present = {p.name for p in directory.glob("*.yaml")}
    return sorted(name for name in fresh.keys() | present
                  if name not in fresh or name not in present or (directory / name).read_text() != fresh[name])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file is stale")
    parser.add_argument("--dir", type=Path, default=HERE, help="where the manifests live (default: %(default)s)")
    args = parser.parse_args(argv)
    fresh = render()
    names = stale(args.dir, fresh)
    if args.check:
        for name in names:
            print(f"{args.dir / name}: stale (differs from a fresh render of charts/tdm); run "
                  f"`python k8s/generate.py`", file=sys.stderr)
        return 1 if names else 0
    for name in names:
        path = args.dir / name
        if name in fresh:
            path.write_text(fresh[name])
            print(f"wrote {path}")
        else:                                        # a template the chart no longer has
            path.unlink()
            print(f"removed {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
