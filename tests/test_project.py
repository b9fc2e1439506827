"""Project hygiene: the README's two set-up commands, and CI running the test one verbatim."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    return re.findall(r"```bash\n(python3 -m venv[^\n]*)\n```", (ROOT / "README.md").read_text())


def test_readme_has_exactly_two_setup_commands():
    cmds = readme_commands()
    assert len(cmds) == 2
    assert cmds[0].endswith("python pipelines/distill.py") and "pytest" in cmds[1]
    assert all("-c constraints.txt" in c for c in cmds)


def test_ci_runs_the_readme_test_command():
    assert readme_commands()[1] in (ROOT / ".ci" / "run").read_text()


def test_constraints_pin_the_cpu_torch_wheel():
    pins = (ROOT / "constraints.txt").read_text().splitlines()
    assert "torch==2.13.0" in pins and any(p.startswith("mlflow==3.17.") for p in pins)


def test_docstring_citations_resolve_inside_the_repository():
    """Every `docs/<page>.md` a module cites exists, and so does every section (§n) and equation (n.m) it names;
    nothing cites notes outside the repository."""
    method = (ROOT / "docs" / "method.md").read_text()
    sections = set(re.findall(r"^## (§\d+)", method, re.M))
    equations = set(re.findall(r"\((\d+\.\d+)\)", method))
    cited = 0
    for path in sorted((ROOT / "tdm").rglob("*.py")):
        text = path.read_text()
        assert "tdm-method.md" not in text and "shared/notes" not in text, path
        for page in re.findall(r"docs/([\w-]+)\.md", text):
            assert (ROOT / "docs" / f"{page}.md").is_file(), (path, page)
        for ref in re.findall(r"docs/method\.md[^)\n]*", text):
            for sec in re.findall(r"§\d+", ref):
                assert sec in sections, (path, ref)
                cited += 1
            for eq in re.findall(r"(?:eqs?\.|table) (\d+\.\d+)(?:-(\d+\.\d+))?", ref):
                for n in filter(None, eq):
                    assert n in equations, (path, ref)
                    cited += 1
    assert cited >= 20


def test_architecture_page_names_real_modules():
    """docs/architecture.md and the README's layout name modules that exist (MLflow run tags aside)."""
    run_tags = {"teacher_identity", "run_name", "last_checkpoint", "code_version", "storage", "version", "failure"}
    for doc in (ROOT / "docs" / "architecture.md", ROOT / "README.md"):
        for mod in set(re.findall(r"\btdm\.([a-z_]+(?:\.[a-z_]+)*)", doc.read_text())) - run_tags:
            parts = mod.split(".")
            while parts:
                base = ROOT / "tdm" / Path(*parts)
                if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file():
                    break
                parts.pop()   # tdm.spec.ModelSpec -> tdm.spec; an attribute, not a module
            assert parts, f"{doc.name} names tdm.{mod}, which is not a module of tdm/"
        for path in set(re.findall(r"`(tdm/[\w/.]+\.py)`", doc.read_text())):
            assert (ROOT / path).is_file(), (doc.name, path)
