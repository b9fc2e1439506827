"""Evaluate a distillation checkpoint and register it as a model version of its run.

Checkpoints are listed in each MLflow run under `checkpoints/step_<n>.json` (with their storage URI).

    python pipelines/register.py --checkpoint "${TDM_HOME:-$HOME/.tdm}/runs/my-run/checkpoint_0000300"
    python pipelines/register.py --checkpoint s3://bucket/runs/my-run/checkpoint_0000300 --eval.num_samples 500

Options after --checkpoint override the run's config (e.g. --gate.*, --eval.*, --registry.*).
"""
import sys

from tdm.cli import build_arg_parser, config_from_args, print_summary, run_cli


def main(argv=None) -> int:
    parser = build_arg_parser(__doc__)
    parser.add_argument("--checkpoint", required=True, help="Checkpoint directory or s3:// URI.")
    args = parser.parse_args(argv)

    def job():
        from tdm.job import register_checkpoint

        print_summary(register_checkpoint(args.checkpoint, lambda base: config_from_args(args, base)))

    return run_cli("register.py", job)


if __name__ == "__main__":
    sys.exit(main())
