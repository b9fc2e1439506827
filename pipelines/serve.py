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


def main(argv=None) -> int:
    from pydantic import ValidationError

    from tdm.console import install_output

    install_output()   # a pod's log gets plain lines: no colour codes from Ray's prefixes (tdm.console)

    from tdm.serve import ServeConfig, serve_config
    from tdm.serve.app import deployment_options
    from tdm.serve.auth import ENV, bind_refusal
    from tdm.serve.config import ServeResources

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)  # a flag names an option exactly
    for name, field in (ServeConfig.model_fields | ServeResources.model_fields).items():
        # a bare --flag means true; its value is the models' to check (one line naming the flag)
        extra = {"nargs": "?", "const": "true"} if field.annotation is bool else {}
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, default=argparse.SUPPRESS,
                       help=f"{field.description} [default: {field.default}]", **extra)
    p.add_argument("--host", default="127.0.0.1", help="Address to bind; a non-loopback one needs API keys "
                   f"(--api-keys-file or ${ENV}) or --insecure-no-auth.")
    p.add_argument("--port", default="8000", help="Port to bind (1-65535).")
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
    if not (port.isdigit() and 1 <= int(port) <= 65535):
        print(f"serve.py: error: --port: an integer in 1-65535, got {port!r}", file=sys.stderr)
        return 2
    try:
        cfg = ServeConfig.model_validate({k: v for k, v in args.items() if k in ServeConfig.model_fields})
        res = ServeResources.model_validate({k: v for k, v in args.items() if k in ServeResources.model_fields})
    except ValidationError as e:
        err = e.errors()[0]
        flag, *where = err["loc"]
        item = f" (item {where[0]})" if where else ""
        print(f"serve.py: error: --{str(flag).replace('_', '-')}{item}: {err['msg']}", file=sys.stderr)
        return 2
    refusal = None if print_only else bind_refusal(host, keyed, insecure)
    if refusal:
        print(f"serve.py: error: {refusal}", file=sys.stderr)
        return 2
    if print_only:
        print(json.dumps(serve_config({**cfg.model_dump(), **res.model_dump()}), indent=2))
        print(f"# derived deployment options: {json.dumps(deployment_options(cfg))}", file=sys.stderr)
        return 0
    import ray
    from ray import serve

    from tdm.serve import build_app

    ray.init(address=address) if address else ray.init(include_dashboard=False)
    serve.start(http_options={"host": host, "port": int(port)})
    serve.run(build_app({**cfg.model_dump(exclude_unset=True), **res.model_dump()}), name="tdm", route_prefix="/")
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
