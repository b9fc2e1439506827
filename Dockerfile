# syntax=docker/dockerfile:1
# The tdm image of the chart (charts/tdm) and of k8s/: Ray head, worker and job-submitter pods, and by
# default the MLflow server. Ray 2.60 on Python 3.11, tdm's pinned dependencies, tdm/ and pipelines/
# under /app (values.yaml image.appDir).
#
#   docker build -t REGISTRY/tdm:0.1.0 .                                     # image.repository (CPU)
#   docker build --build-arg RAY_VARIANT=-cu128 -t REGISTRY/tdm-cuda:0.1.0 .  # gpuImage.repository
#
# RAY_VARIANT is the platform suffix of the rayproject/ray tag: "" (CPU), -gpu or -cuXXX.
# RAY_VERSION must equal the chart's ray.version (the RayCluster's rayVersion).
ARG RAY_VERSION=2.60.0
ARG RAY_VARIANT=""
FROM rayproject/ray:${RAY_VERSION}-py311${RAY_VARIANT}
ARG RAY_VARIANT

# rayproject/ray runs as `ray`, uid 1000, gid 100 ("users"), and its Python (/home/ray/anaconda3) belongs
# to that user (ray-project/ray docker/base-deps/Dockerfile: RAY_UID=1000, RAY_GID=100, `USER $RAY_UID`).
# uid 1000 stays the runtime user (the chart's securityContext.runAsUser; USER is numeric so the kubelet
# can check runAsNonRoot), but it owns nothing the image runs: everything below is installed as root,
# and the Python prefix the base image gave to uid 1000 is handed to root and made read-only for
# everyone else, so a compromised process cannot rewrite tdm, its dependencies or Ray (the chart also
# mounts the root filesystem read-only; this holds wherever the image runs). The chown copies the base
# image's Python into this layer once (larger image), in the dependency layer, which is rebuilt only
# when pyproject.toml or constraints.txt change.
USER root
# The base image also gives uid 1000 passwordless sudo (group sudo, and 'ray ALL=NOPASSWD: ALL' in
# /etc/sudoers): taken back, so the runtime user cannot become root either (the chart's
# allowPrivilegeEscalation: false blocks setuid anyway; this holds outside it too).
RUN sed -i '/^ray ALL=NOPASSWD: ALL$/d' /etc/sudoers \
 && if id -nG ray | grep -qw sudo; then gpasswd -d ray sudo; fi
WORKDIR /app

# Dependencies first, from pyproject.toml's list under constraints.txt's pins: this layer is rebuilt
# only when those two files change, not on every code change. constraints.txt pins torch==2.13.0,
# which the PyTorch CPU index serves as 2.13.0+cpu (PyPI's Linux wheel of the same version is the CUDA
# build, right for the GPU variants). psycopg2-binary (MLflow's Postgres driver for the server in
# mlflow.yaml) is not a tdm dependency, so it is named here; constraints.txt pins it, the version that
# tests/test_mlflow_server.py runs that server with. mlflow[auth] adds Flask-WTF, which the server's
# basic-auth app (mlflow.auth.enabled, the chart's default) cannot start without; pinned here until
# constraints.txt pins it.
COPY pyproject.toml constraints.txt ./
RUN python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/requirements.txt \
 && case "$RAY_VARIANT" in \
        ""|-cpu) torch_index="--extra-index-url https://download.pytorch.org/whl/cpu" ;; \
        *) torch_index="" ;; \
    esac \
 && pip install --no-cache-dir $torch_index -c constraints.txt -r /tmp/requirements.txt psycopg2-binary \
        "mlflow[auth]" Flask-WTF==1.3.0 WTForms==3.3.2 \
 && rm /tmp/requirements.txt \
 && prefix="$(python -c 'import sys; print(sys.prefix)')" \
 && chown -R 0:0 "$prefix" \
 && chmod -R go-w "$prefix"

# The code, owned by root (COPY without --chown), readable by all, writable by none but root. Editable,
# so `import tdm` resolves to /app/tdm: the same files the RayJob ships as its working_dir and the
# RayService puts on PYTHONPATH, not a second copy in site-packages.
COPY README.md ./
COPY tdm/ tdm/
COPY pipelines/ pipelines/
RUN pip install --no-cache-dir --no-deps -c constraints.txt -e . \
 && chmod -R go-w /app

# The runtime user: non-root, owner of none of the above. Its HOME (/home/ray) is not where the chart's
# pods write: they set HOME=/tmp on an emptyDir.
USER 1000
