"""Distil a diffusion teacher into a few-step student with TDM, on Ray Train, tracked in MLflow.

With no arguments it runs the embedded default on a laptop: the toy digits teacher (trained and
registered on first use), a local Ray instance and the local MLflow store ($TDM_HOME, ~/.tdm).

    python pipelines/distill.py                                   # embedded default
    python pipelines/distill.py --student.step_set 1,2,4          # TDM-unify: one student for 1/2/4 steps
    python pipelines/distill.py --name my-run                     # run again with the same name to resume
    python pipelines/distill.py --plan --train.gpu_memory_gb 80   # memory per worker, before any work
    ray job submit --address http://HEAD:8265 --working-dir . -- python pipelines/distill.py ...

Every option is a config field (`--section.field value`); `--config FILE.yaml` sets many at once.
"""
import sys

from tdm.cli import build_arg_parser, config_from_args, print_summary, run_cli


def main(argv=None) -> int:
    parser = build_arg_parser(__doc__)
    parser.add_argument("--plan", action="store_true", help="Print the estimated memory per worker (strategy, "
                        "workers, precision, checkpointing) and exit; with --train.gpu_memory_gb, fail if it does "
                        "not fit.")
    args = parser.parse_args(argv)

    def job():
        cfg = config_from_args(args)
        if getattr(args, "print_config", False):
            print(cfg.model_dump_json(indent=2))
            return
        if getattr(args, "plan", False):   # the parser leaves unset flags out (argparse.SUPPRESS)
            from tdm.preflight import memory_plan
            from tdm.teacher import resolve_teacher

            teacher = None if cfg.toy_kind else resolve_teacher(cfg.teacher.uri)
            plan = memory_plan(cfg, teacher, check=False)
            print(f"estimated memory per worker ({cfg.train.strategy}, {cfg.train.num_workers} worker(s), "
                  f"{cfg.student.finetune}; docs/scaling.md):\n{plan.table()}")
            memory_plan(cfg, teacher)   # with train.gpu_memory_gb: fails naming what would fit
            return
        from tdm.job import distill

        print_summary(distill(cfg))

    return run_cli("distill.py", job)


if __name__ == "__main__":
    sys.exit(main())
