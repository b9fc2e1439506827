"""Serve a registered tdm model over HTTP with Ray Serve (OpenAI Images API compatible).

    python pipelines/serve.py                                        # models:/tdm-student@champion
    python pipelines/serve.py --model-uri models:/tdm-student/3 --port 8000
    curl -s localhost:8000/v1/images/generations -d '{"prompt": "a handwritten digit 7", "n": 2}'

Starts a local Ray instance unless RAY_ADDRESS / --address names a cluster. `--print-config` prints
the equivalent Serve config (for `serve deploy` or a RayService serveConfigV2) and exits.
"""
import argparse
import json
import os
import sys
import time


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def main(argv=None) -> int:
    from pydantic import ValidationError

    from tdm.serve import ServeConfig, serve_config
    from tdm.serve.app import deployment_options
    from tdm.serve.auth import ENV

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)  # a flag names an option exactly
    for name, field in ServeConfig.model_fields.items():
        # a bare --flag means true; its value is ServeConfig's to check (one line naming the flag)
        extra = {"nargs": "?", "const": "true"} if field.annotation is bool else {}
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, default=argparse.SUPPRESS,
                       help=f"{field.description} [default: {field.default}]", **extra)
    p.add_argument("--num-replicas", type=int, default=1, help="Generator replicas.")
    p.add_argument("--num-gpus", type=float, default=0, help="GPUs per generator replica.")
    p.add_argument("--num-cpus", type=float, default=1, help="CPUs reserved per generator replica.")
    p.add_argument("--host", default="127.0.0.1", help="Address to bind; a non-loopback one needs API keys "
                   f"(--api-keys-file or ${ENV}) or --insecure-no-auth.")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--insecure-no-auth", action="store_true", help="Serve without API keys on a non-loopback "
                   "address (anyone who reaches the port can generate).")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), help="Ray cluster address.")
    p.add_argument("--print-config", action="store_true", help="Print the resolved Serve config and exit.")
    args = vars(p.parse_args(argv))
    host, port, address, print_only, insecure = (args.pop(k) for k in ("host", "port", "address", "print_config",
                                                                       "insecure_no_auth"))
    if "upscale_factors" in args:
        try:
            args["upscale_factors"] = [int(x) for x in str(args["upscale_factors"]).split(",")]
        except ValueError:
            print(f"serve.py: error: --upscale-factors: integers separated by commas (e.g. 1,4), got "
                  f"{args['upscale_factors']!r}", file=sys.stderr)
            return 2
    keyed = bool(args.get("api_keys_file")) or bool(os.environ.get(ENV, "").strip())
    if keyed:
        args.setdefault("require_api_key", True)  # keys were asked for: fail closed if they vanish
    try:
        cfg = ServeConfig.model_validate({k: v for k, v in args.items() if k in ServeConfig.model_fields})
    except ValidationError as e:
        err = e.errors()[0]
        flag, *where = err["loc"]
        item = f" (item {where[0]})" if where else ""
        print(f"serve.py: error: --{str(flag).replace('_', '-')}{item}: {err['msg']}", file=sys.stderr)
        return 2
    if not (_is_loopback(host) or keyed or insecure or print_only):
        print(f"serve.py: error: --host {host}: refusing to serve a non-loopback address without API keys; give "
              f"--api-keys-file PATH or ${ENV}, or --insecure-no-auth", file=sys.stderr)
        return 2
    if print_only:
        extras = {k: args[k] for k in ("num_replicas", "num_gpus", "num_cpus")}
        print(json.dumps(serve_config({**cfg.model_dump(), **extras}), indent=2))
        print(f"# derived deployment options: {json.dumps(deployment_options(cfg))}", file=sys.stderr)
        return 0
    import ray
    from ray import serve

    from tdm.serve import build_app

    ray.init(address=address) if address else ray.init(include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(args), name="tdm", route_prefix="/")
    auth = "API keys required" if keyed else "no API keys (open)"
    print(f"[tdm] serving on http://{host}:{port}/ (playground) and /v1/images/generations; {auth} "
          "(Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
