"""Distil on Kubernetes, promote the student and point serving at it: one RayJob, one alias, one patch.

    python pipelines/workflow.py --config run.yaml --rayjob k8s/rayjob-distill.yaml \\
        --rayservice tdm-serve --namespace tdm --kubeconfig ~/.kube/config
    helm template tdm charts/tdm -n tdm > all.yaml && python pipelines/workflow.py --rayjob all.yaml \\
        --rayservice tdm-serve --namespace tdm --student.num_steps 2 --name sd15-k2 --dry-run

1. creates a RayJob from the --rayjob template (a RayJob manifest, e.g. `helm template` output) whose
   entrypoint is `python pipelines/distill.py` with the config's non-default fields: the template's own
   flags, then --config FILE, then --section.field flags. Each submission gets a new RayJob name; the
   run name (--name, default tdm-<timestamp>) stays, so running again with the same --name resumes.
2. follows it until Complete / Failed (--timeout; it is never deleted);
3. moves registry.alias (champion) to the version the run registered in MLflow, if its quality gate
   passed (--force: anyway);
4. merge-patches the RayService's serveConfigV2 so its tdm app serves models:/<model>/<version>.

--dry-run prints the RayJob and the plan as YAML and contacts nothing. MLflow: --tracking-uri, else
$MLFLOW_TRACKING_URI, else the job's own MLFLOW_TRACKING_URI (when this runs inside the cluster).
"""
import sys

from tdm.cli import build_arg_parser, run_cli


def main(argv=None) -> int:
    parser = build_arg_parser(__doc__)
    parser.usage = ("%(prog)s --rayjob FILE --rayservice NAME [--namespace NS] [--dry-run] [--config FILE] "
                    "[--section.field VALUE ...]")
    w = parser.add_argument_group("workflow")
    w.add_argument("--rayjob", required=True, help="RayJob template: a manifest file with one RayJob.")
    w.add_argument("--rayservice", required=True, help="Name of the RayService to point at the new version.")
    w.add_argument("--namespace", default=None, help="Namespace of both (default: the template's).")
    w.add_argument("--kubeconfig", default=None, help="Kubeconfig file (default: $KUBECONFIG, ~/.kube/config, "
                   "or the pod's service account in a cluster).")
    w.add_argument("--context", default=None, help="Kubeconfig context (default: the current one).")
    w.add_argument("--tracking-uri", dest="tracking_uri", default=None, help="MLflow tracking URI.")
    w.add_argument("--timeout", type=float, default=172800, help="Seconds to follow the RayJob [default: 2 days].")
    w.add_argument("--poll-interval", dest="poll_interval", type=float, default=10, help="Seconds between polls.")
    w.add_argument("--force", action="store_true", default=False,
                   help="Promote even if the quality gate did not pass.")
    w.add_argument("--dry-run", dest="dry_run", action="store_true", default=False,
                   help="Print what would happen; touch nothing.")
    args = parser.parse_args(argv)

    def job():
        import yaml

        from tdm import workflow as wf

        template = wf.load_rayjob_template(args.rayjob)
        cfg = wf.resolve_config(args, template)
        if getattr(args, "print_config", False):
            print(cfg.model_dump_json(indent=2))
            return
        namespace = wf.namespace_of(args.namespace, template)
        rayjob = wf.build_rayjob(template, cfg, namespace)
        tracking_uri = wf.tracking_uri_of(args.tracking_uri, template)
        if args.dry_run:
            docs = wf.dry_run_documents(rayjob, cfg, args.rayservice, tracking_uri, args.timeout)
            print(yaml.safe_dump_all(docs, sort_keys=False, width=1 << 16), end="")  # one-line entrypoint
            return
        cluster = wf.Cluster(*wf.kube_api(args.kubeconfig, args.context), namespace)
        wf.run_workflow(cfg, rayjob, cluster, args.rayservice, tracking_uri, args.timeout, args.poll_interval,
                        args.force)

    from tdm.workflow import WorkflowError

    try:
        return run_cli("workflow.py", job)
    except WorkflowError as e:      # the input was fine; the job, the gate or an API call was not
        print(f"workflow.py: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
