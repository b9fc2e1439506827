"""The command line over the config schema (tdm.config): every leaf field is a flag `--section.field`
(or `--field` at top level); `--config FILE` reads YAML or JSON first and flags override it. Bad input
ends as one line naming the field and exit code 2 (`run_cli`).
"""
from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from .config import TDMConfig, flatten, load_config
from .errors import ConfigError, TDMError
from .presets import PRESETS, preset


def _leaf_fields(model: type[BaseModel], prefix: str = ""):
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _leaf_fields(ann, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", f


def _is_sequence(ann) -> bool:
    for a in (ann, *typing.get_args(ann)):
        if typing.get_origin(a) in (list, tuple):
            return True
    return False


def _parse_value(raw: str, ann) -> Any:
    optional = type(None) in typing.get_args(ann) or isinstance(ann, types.UnionType) and type(None) in ann.__args__
    if optional and raw.strip().lower() in ("none", "null"):
        return None
    if _is_sequence(ann):
        raw = raw.strip()
        if raw.startswith(("[", "{")):
            return json.loads(raw)
        return [] if raw == "" else [x.strip() for x in raw.split(",")]
    return raw


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line naming the flag (--help lists them all)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_arg_parser(description: str) -> argparse.ArgumentParser:
    # allow_abbrev=False: a flag must name a field exactly (--train.max_step 10 must not run a 10-step job)
    p = OneLineParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage="%(prog)s [--config FILE] [--section.field VALUE ...]",
                                argument_default=argparse.SUPPRESS, allow_abbrev=False)
    p.add_argument("--config", help="YAML or JSON file with a (partial) nested config; flags override it.")
    p.add_argument("--preset", metavar="NAME", help=f"Published settings to start from, before --config and flags "
                   f"(tdm.presets: {', '.join(sorted(PRESETS))}).")
    p.add_argument("--print-config", action="store_true", help="Print the resolved config as JSON and exit.")
    defaults = flatten(TDMConfig().model_dump(mode="json"))
    groups: dict[str, argparse._ArgumentGroup] = {}
    for key, f in _leaf_fields(TDMConfig):
        section = key.split(".")[0] if "." in key else "run"
        g = groups.setdefault(section, p.add_argument_group(section))
        default = defaults[key]
        help_ = f"{f.description} [default: {default if default is not None else 'none'}]".replace("%", "%%")
        g.add_argument(f"--{key}", dest=key, metavar="V", help=help_)
    return p


def config_from_args(args: argparse.Namespace, base: dict | None = None) -> TDMConfig:
    """Merge `base` (e.g. a checkpoint's config), then --preset NAME, then --config FILE, then
    --section.field flags into a validated TDMConfig."""
    import copy

    import yaml

    data: dict[str, Any] = copy.deepcopy(base) if base else {}
    if getattr(args, "preset", None):
        for section, values in preset(args.preset).items():
            data.setdefault(section, {}).update(values)
    if getattr(args, "config", None):
        path = Path(args.config)
        if not path.is_file():
            raise ConfigError(f"--config: file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"--config: {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
            raise ConfigError(f"--config: {path} is not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config: {path} must contain a mapping of config sections")
        for section, values in loaded.items():
            if isinstance(values, dict) and isinstance(data.get(section), dict):
                data[section].update(values)
            else:
                data[section] = values
    fields = dict(_leaf_fields(TDMConfig))
    for key, raw in vars(args).items():
        if key not in fields:
            continue
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{part}: expected a section, got {node!r}")
        try:
            node[leaf] = _parse_value(raw, fields[key].annotation)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--{key}: cannot parse {raw!r}: {e}") from None
    return load_config(data)


def run_cli(prog: str, job) -> int:
    """Run job() for an entry point: a TDMError (bad input: a field, an option, a changed teacher) becomes
    one line on stderr and exit code 2 (3 for an unavailable service, tdm.errors.ServiceUnavailableError).
    Output that is not a terminal is kept free of control sequences (tdm.console.install_output)."""
    import os

    from .console import install_output

    # Ray's driver holds back a worker line that looks like one from another worker (numbers aside) for up
    # to 5 s, to print it as "[repeated Nx]": tdm's progress lines would then print late, after the summary
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    install_output()
    try:
        job()
    except TDMError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


def print_summary(summary: dict) -> None:
    """The evaluation table and the registry outcome, for the terminal (columns: the evaluator's metrics)."""
    rows, columns = summary.get("rows", {}), summary.get("columns", [])
    if rows:
        widths = [max(9, len(header) + 2) for _, header, _ in columns]
        print(f"\n{'sampler':<18}{'NFE':>5}" + "".join(f"{h:>{w}}" for (_, h, _), w in zip(columns, widths))
              + f"{'ms/sample':>10}")
        for name, r in rows.items():
            cells = "".join(f"{r[key]:>{w}{fmt}}" for (key, _, fmt), w in zip(columns, widths))
            print(f"{name:<18}{r['nfe']:>5}{cells}{r['latency_ms']:>10.2f}")
    what = "already registered as version" if summary.get("already_registered") else "registered version"
    print(f"\nrun {summary['run_name']} (MLflow run {summary['run_id']}): {what} "
          f"{summary['model_version']}, gate {'passed' if summary['passed'] else 'not passed'}")
    if summary.get("run_url"):
        print(f"MLflow: {summary['run_url']}")
