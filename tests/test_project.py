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
