"""MLflow bootstrap of the tdm chart: the users and grants of `mlflow server --app-name basic-auth`.

Run by the chart's post-install/post-upgrade hook Job (templates/mlflow-bootstrap.yaml) as the admin user
(MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD) against MLFLOW_TRACKING_URI. Every step is
idempotent, so every `helm upgrade` runs it again and puts things back as they should be:

1. wait until the server answers GET /health (at most --timeout-s seconds);
2. the training user (TDM_TRAINING_USERNAME / _PASSWORD) and the serving user (TDM_SERVING_USERNAME /
   _PASSWORD): created if missing, else their password set to the Secret's (so rotating the Secret and
   upgrading rotates the password), and neither is an admin;
3. each --experiment and --model exists (created by the admin when missing, so no other user can create
   it first and own it);
4. the training user gets MANAGE on each of them (log runs, register versions, set and move aliases);
   the serving user gets READ on each (what the server's default_permission READ gives anyway, made
   explicit). Nobody else is granted anything: every other user reads, and no one but the training user
   (and the admin) can register a version or move an alias.

Only the Python standard library: it runs in the tdm image as it is, read-only root filesystem included.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

TRAINING_PERMISSION = "MANAGE"
SERVING_PERMISSION = "READ"


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status, self.code = status, code


class Client:
    def __init__(self, uri: str, username: str, password: str):
        self.uri = uri.rstrip("/")
        token = base64.b64encode(f"{username}:{password}".encode()).decode()
        self.headers = {"Authorization": f"Basic {token}", "Content-Type": "application/json"}

    def call(self, method: str, path: str, body: dict | None = None, params: dict | None = None) -> dict:
        url = f"{self.uri}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method, headers=self.headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                text = resp.read().decode() or "{}"
        except urllib.error.HTTPError as err:
            text = err.read().decode(errors="replace")
            try:
                payload = json.loads(text)
            except ValueError:
                payload = {"message": text}
            raise ApiError(err.code, payload.get("error_code", ""), payload.get("message", text)[:500]) from None
        return json.loads(text)


def wait_for_server(uri: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"mlflow-bootstrap: {uri}/health did not answer 200 within {timeout_s:.0f}s")
        time.sleep(3)


def ensure_user(client: Client, username: str, password: str) -> str:
    try:
        user = client.call("GET", "/api/2.0/mlflow/users/get", params={"username": username})["user"]
    except ApiError as err:
        if err.code != "RESOURCE_DOES_NOT_EXIST" and err.status != 404:
            raise
        client.call("POST", "/api/2.0/mlflow/users/create", {"username": username, "password": password})
        return "created"
    client.call("PATCH", "/api/2.0/mlflow/users/update-password", {"username": username, "password": password})
    if user.get("is_admin"):
        client.call("PATCH", "/api/2.0/mlflow/users/update-admin", {"username": username, "is_admin": False})
    return "updated"


def ensure_experiment(client: Client, name: str) -> str:
    try:
        return client.call("GET", "/api/2.0/mlflow/experiments/get-by-name",
                           params={"experiment_name": name})["experiment"]["experiment_id"]
    except ApiError as err:
        if err.code != "RESOURCE_DOES_NOT_EXIST":
            raise
    return client.call("POST", "/api/2.0/mlflow/experiments/create", {"name": name})["experiment_id"]


def ensure_model(client: Client, name: str) -> str:
    try:
        client.call("GET", "/api/2.0/mlflow/registered-models/get", params={"name": name})
    except ApiError as err:
        if err.code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.call("POST", "/api/2.0/mlflow/registered-models/create", {"name": name})
    return name


def ensure_grant(client: Client, username: str, resource_type: str, resource_id: str, permission: str) -> None:
    """`permission` for `username` on one resource, replacing another grant of that user on it."""
    grant = {"username": username, "resource_type": resource_type, "resource_id": resource_id}
    try:
        client.call("POST", "/api/3.0/mlflow/users/permissions/grant", {**grant, "permission": permission})
        return
    except ApiError as err:
        if err.code != "RESOURCE_ALREADY_EXISTS":
            raise
    current = client.call("GET", "/api/3.0/mlflow/users/permissions/get", params=grant).get("permission")
    if current != permission:
        client.call("POST", "/api/3.0/mlflow/users/permissions/revoke", grant)
        client.call("POST", "/api/3.0/mlflow/users/permissions/grant", {**grant, "permission": permission})


def env(name: str) -> str:
    value = os.environ.get(name, "").strip()
    if not value:
        raise SystemExit(f"mlflow-bootstrap: ${name} is empty (check the Secret it comes from)")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", action="append", default=[], help="an experiment the training user manages")
    parser.add_argument("--model", action="append", default=[], help="a registered model the training user manages")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="how long to wait for the server")
    args = parser.parse_args(argv)

    uri = env("MLFLOW_TRACKING_URI")
    admin = Client(uri, env("MLFLOW_TRACKING_USERNAME"), env("MLFLOW_TRACKING_PASSWORD"))
    training, serving = env("TDM_TRAINING_USERNAME"), env("TDM_SERVING_USERNAME")
    if training == serving:
        raise SystemExit("mlflow-bootstrap: the training and serving users must differ")
    wait_for_server(uri, args.timeout_s)
    for username, password_var in ((training, "TDM_TRAINING_PASSWORD"), (serving, "TDM_SERVING_PASSWORD")):
        print(f"user {username}: {ensure_user(admin, username, env(password_var))}", flush=True)
    resources = [("experiment", ensure_experiment(admin, name), name) for name in dict.fromkeys(args.experiment)]
    resources += [("registered_model", ensure_model(admin, name), name) for name in dict.fromkeys(args.model)]
    for resource_type, resource_id, name in resources:
        ensure_grant(admin, training, resource_type, resource_id, TRAINING_PERMISSION)
        ensure_grant(admin, serving, resource_type, resource_id, SERVING_PERMISSION)
        print(f"{resource_type} {name}: {training} {TRAINING_PERMISSION}, {serving} {SERVING_PERMISSION}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
